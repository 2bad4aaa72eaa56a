//! What the test's bucket holds.

use k6_ingest::message::RunCompleted;
use k6_ingest::s3::ArtifactStore;

/// Reads a whole S3 object.
pub async fn get_object(store: &ArtifactStore, key: &str) -> Vec<u8> {
    let out = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(key)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

pub async fn put_object(store: &ArtifactStore, bucket: &str, key: &str, body: &[u8]) {
    store
        .client()
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
}

/// Every key under `prefix` in `bucket` (the first 1,000, more than any test writes).
pub async fn keys_under(store: &ArtifactStore, bucket: &str, prefix: &str) -> Vec<String> {
    let listed = store
        .client()
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

/// Every key in the test's bucket.
pub async fn all_keys(store: &ArtifactStore) -> Vec<String> {
    keys_under(store, store.bucket(), "").await
}

/// Every object key under the run's prefix in the test's bucket.
pub async fn objects_of_run(store: &ArtifactStore, msg: &RunCompleted) -> Vec<String> {
    let prefix = run_key(store, msg, "");
    keys_under(store, store.bucket(), &prefix).await
}

/// The keys under `runs/` in the test's bucket that belong to a run.
pub async fn s3_keys(store: &ArtifactStore, run_id: &str) -> Vec<String> {
    keys_under(store, store.bucket(), "runs/")
        .await
        .into_iter()
        .filter(|k| k.contains(run_id))
        .collect()
}

/// The size the server reports for an object.
pub async fn object_size(store: &ArtifactStore, key: &str) -> i64 {
    let head = store
        .client()
        .head_object()
        .bucket(store.bucket())
        .key(key)
        .send()
        .await
        .unwrap();
    head.content_length().unwrap()
}

/// The key of a run's artifact `name` in the store.
pub fn run_key(store: &ArtifactStore, msg: &RunCompleted, name: &str) -> String {
    store.key_for(msg.organization_id, msg.project_id, msg.run_id, name)
}
