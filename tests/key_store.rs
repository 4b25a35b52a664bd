//! The key store on the real CQL store: a subject's first key is made once (two makers at
//! once agree on it), is stored only wrapped, opens what it sealed from another process,
//! and once destroyed opens nothing and is never made again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use parley_events::sealing::{KeyWrapper, MasterKey};
use parley_projections::keys::{KeyStore, SubjectKey};
use parley_projections::{CqlSettings, ProjectionError, Store};

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_made_once_stored_wrapped_and_destroyed_for_good() {
    let Some(stack) = support::stack() else { return };
    let settings = CqlSettings {
        nodes: stack.cql.clone(),
        keyspace: format!("parley_keys_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let store = Store::connect(&settings).await.unwrap();
    let master: Arc<dyn KeyWrapper> =
        Arc::new(MasterKey::from_base64(&MasterKey::generate_base64(), "local:test").unwrap());
    let (one, two) =
        (KeyStore::open(&store, master.clone()).await.unwrap(), KeyStore::open(&store, master.clone()).await.unwrap());
    assert!(matches!(one.key("u-alice").await.unwrap(), SubjectKey::None));

    // Two processes seal Alice's first content at once: one key wins, both use it.
    let (a, b) = tokio::join!(one.key_for_sealing("u-alice"), two.key_for_sealing("u-alice"));
    let (a, b) = (a.unwrap(), b.unwrap());
    let event: parley_events::EventId = uuid::Uuid::new_v4().into();
    let sealed = a.seal(&event, "text", "alice's canary 5b1e");
    assert_eq!(b.open(&event, "text", &sealed).as_deref(), Ok("alice's canary 5b1e"));
    // A third process, reading it back from the store, opens it too; the row holds no key in clear.
    let three = KeyStore::open(&store, master.clone()).await.unwrap();
    let SubjectKey::Live(read) = three.key("u-alice").await.unwrap() else { panic!("alice has a key") };
    assert_eq!(read.open(&event, "text", &sealed).as_deref(), Ok("alice's canary 5b1e"));
    let bob = one.key_for_sealing("u-bob").await.unwrap();

    // Erased: the key is gone for every process, and none is made again.
    one.destroy("u-alice").await.unwrap();
    one.destroy("u-alice").await.unwrap();
    let fresh = KeyStore::open(&store, master).await.unwrap();
    assert!(matches!(fresh.key("u-alice").await.unwrap(), SubjectKey::Erased(_)));
    two.forget("u-alice");
    assert!(matches!(two.key("u-alice").await.unwrap(), SubjectKey::Erased(_)));
    assert!(matches!(fresh.key_for_sealing("u-alice").await, Err(ProjectionError::Erased(_))));
    let session = scylla::client::session_builder::SessionBuilder::new().known_node(&stack.cql).build().await.unwrap();
    let rows = session
        .query_unpaged(format!("SELECT subject FROM {}.data_keys", settings.keyspace), ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num();
    assert_eq!(rows, 1, "only Bob's wrapped key is left");
    let e: parley_events::EventId = uuid::Uuid::new_v4().into();
    let SubjectKey::Live(bob_again) = fresh.key("u-bob").await.unwrap() else { panic!("bob is untouched") };
    assert_eq!(bob_again.open(&e, "text", &bob.seal(&e, "text", "bob")).as_deref(), Ok("bob"));
}
