//! Servers a test stands between the worker and a service, or in place of one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use k6_ingest::config::Settings;
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The `/metrics` value of one sample line, 0 when absent.
pub async fn scrape(addr: SocketAddr, sample: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until `/readyz` answers `status`.
pub async fn wait_readyz(addr: SocketAddr, status: u16) {
    super::wait_for(&format!("/readyz {status}"), || async {
        (readyz(addr).await == Some(status)).then_some(())
    })
    .await;
}

/// A TCP proxy a test can cut and restore: a fault (a service going away and coming
/// back) that a shared real service cannot be made to show on cue for one test alone.
/// Cut, it stops listening (new connections are refused, as with a stopped service) and
/// drops the open ones; restored, it listens again on the same port. It counts the
/// connections it accepted: none means the client sent no request.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    connections: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = watch::channel(true);
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            let mut listener = Some(listener);
            let mut state = rx.clone();
            loop {
                let Some(l) = &listener else {
                    if state.wait_for(|up| *up).await.is_err() {
                        return;
                    }
                    listener = Some(rebind(addr).await);
                    continue;
                };
                let accepted = tokio::select! {
                    a = l.accept() => a.ok(),
                    r = state.wait_for(|up| !*up) => {
                        if r.is_err() {
                            return;
                        }
                        None
                    }
                };
                let Some((client, _)) = accepted else {
                    listener = None; // cut: refuse new connections
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let a = async { tokio::io::copy(&mut cr, &mut sw).await };
                    let b = async { tokio::io::copy(&mut sr, &mut cw).await };
                    tokio::select! {
                        _ = async { tokio::join!(a, b) } => {}
                        _ = rx.wait_for(|up| !*up) => {} // cut: drop both sides
                    }
                });
            }
        });
        Self {
            addr,
            up,
            connections,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// Listens on `addr` again (the port may take a moment to be free).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                tries += 1;
                assert!(tries < 200, "cannot listen on {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `/readyz`: its status and JSON body.
pub async fn readyz_report(addr: SocketAddr) -> (u16, Value) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

/// The socket address of a `#[sqlx::test]` pool's server.
pub async fn pg_addr(pool: &PgPool) -> SocketAddr {
    let opts = pool.connect_options();
    tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap()
}

/// A pool to the same database through `proxy`, failing fast when it is cut.
pub fn proxied_pool(pool: &PgPool, proxy: &Proxy) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(
            (*pool.connect_options())
                .clone()
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        )
}

/// The S3 endpoint of the settings, as a socket address for a proxy.
pub fn s3_addr(s: &Settings) -> SocketAddr {
    url::Url::parse(s.s3.endpoint.as_deref().unwrap())
        .unwrap()
        .socket_addrs(|| None)
        .unwrap()[0]
}

/// An HTTP server for artifacts whose responses to `/slow/...` wait until released,
/// counting how many such requests are open at once; `/status/NNN/...` answers status
/// NNN and `/hangup/...` closes the connection without answering (faults of one path
/// while the host is up).
#[derive(Clone)]
pub struct SlowServer {
    pub addr: SocketAddr,
    pub open: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl SlowServer {
    /// Serves `body` for every path; paths starting with `/slow/` wait for `release`.
    pub async fn start(body: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            open: Arc::default(),
            peak: Arc::default(),
            release: Arc::default(),
            notify: Arc::default(),
        };
        let s = server.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(s.clone().answer(conn, body.clone()));
            }
        });
        server
    }

    async fn answer(self, mut conn: TcpStream, body: Arc<Vec<u8>>) {
        let Some(path) = request_path(&mut conn).await else {
            return;
        };
        if path.starts_with("/hangup/") {
            return; // closes the connection without an answer
        }
        if let Some(code) = path.strip_prefix("/status/").and_then(|p| p.get(..3)) {
            let head = format!(
                "HTTP/1.1 {code} Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.shutdown().await;
            return;
        }
        if path.starts_with("/slow/") {
            self.wait_for_release().await;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(&body).await;
        let _ = conn.shutdown().await;
    }

    /// Holds one request open until `release`, counting it among the open ones.
    async fn wait_for_release(&self) {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        while !self.release.load(Ordering::SeqCst) {
            let notified = self.notify.notified();
            if self.release.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// Reads a request's head and returns its path; `None` when the client hung up first.
async fn request_path(conn: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&got);
    let line = head.lines().next().unwrap_or_default();
    Some(line.split(' ').nth(1).unwrap_or("/").to_string())
}
