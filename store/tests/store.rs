//! The store's integration suite: every test runs against a throwaway SQLite file and a
//! throwaway database on a real PostgreSQL server (`NODEKEEPER_TEST_POSTGRES_URL`).

use std::sync::Arc;

use nodekeeper_store::on_both_engines;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{
    EventFilter, Generation, HostName, HostState, ImageFormat, InstanceId, NewEvent, NewHost, NewImage, NewInstance,
    OperationStatus, OwnerMove, ReportedDomain, Storage, Store, StoreError,
};
use tokio::sync::Barrier;

on_both_engines!(
    migrations_are_idempotent_and_checked,
    hosts_are_added_listed_and_unique,
    import_is_all_or_nothing,
    import_crosses_batch_boundaries,
    evacuate_bumps_generation_with_an_event,
    evacuate_refuses_bad_requests_and_changes_nothing,
    evacuate_moves_off_a_live_host_only_when_it_is_known_stopped_or_forced,
    stale_generation_is_a_conflict,
    batched_recoveries_fail_one_by_one_or_all_at_once,
    hosts_marked_and_operations_started_in_batches,
    concurrent_evacuations_cannot_both_win,
    delete_keeps_a_tombstone,
    ownership_lookup_is_batched,
    keyed_events_are_recorded_once,
    deploy_tokens_are_single_use_and_expire,
    leases_move_between_macs_and_survive,
    operations_are_unique_per_target_and_advance_by_compare_and_set,
    leadership_is_held_renewed_and_taken_over_only_after_expiry,
    a_writer_under_a_lost_lease_changes_nothing,
    time_is_the_database_servers,
    peers_are_the_watched_hosts_with_an_address_and_a_key_per_pair,
    followers_read_events_in_order_from_an_id,
    a_follower_misses_no_event_while_writers_race,
    host_state_compare_and_set_changes_only_from_the_expected_state,
    the_image_catalogue_refuses_duplicates_and_removal_while_used,
    an_image_removal_and_a_reimage_start_never_both_win,
    admin_tokens_are_unique_revocable_and_touched_once_a_minute,
    operations_are_listed_newest_first_by_host_and_status,
    service_copies_move_by_compare_and_set_and_go_with_their_service,
    a_host_is_removed_only_out_of_service_and_owning_nothing,
    heartbeats_are_one_commit_and_revisions_move_with_what_a_guard_converges_on,
    a_live_migration_keeps_the_owner_until_it_is_finished_or_given_up,
);

fn host(name: &str) -> HostName {
    name.parse().expect("test host name")
}

fn new_host(name: &str, mac: Option<&str>) -> NewHost {
    NewHost {
        name: host(name),
        mac: mac.map(|m| m.parse().expect("test MAC")),
        ip: None,
        bmc_url: None,
        bmc_credentials: None,
    }
}

fn new_instance(owner: &str, n: usize) -> NewInstance {
    NewInstance {
        uuid: InstanceId::random(),
        name: format!("vm-{n}"),
        owner: host(owner),
        ha: n % 2 == 0,
        storage: Storage::Shared,
        generation: Generation::FIRST,
        domain_xml: Some(format!("<domain type='qemu'><name>vm-{n}</name></domain>")),
    }
}

/// A migrated store with hosts `node-a`, `node-b`, `node-c`.
async fn fleet(db: &TestDb) -> Store {
    let store = db.store().await;
    for (name, mac) in
        [("node-a", "52:54:00:00:00:0a"), ("node-b", "52:54:00:00:00:0b"), ("node-c", "52:54:00:00:00:0c")]
    {
        store.add_host(&new_host(name, Some(mac)), "test").await.expect("add host");
    }
    store
}

async fn migrations_are_idempotent_and_checked(db: TestDb) {
    let store = Store::connect(db.url()).await.expect("connect");
    assert_eq!(store.schema_version().await.expect("version"), 0);
    let err = store.check_schema().await.expect_err("an empty database is behind");
    assert!(matches!(err, StoreError::SchemaBehind { applied: 0, .. }), "{err}");
    assert!(err.to_string().contains("db migrate"), "{err}");
    assert!(store.migrate().await.expect("first migrate") >= 1);
    assert_eq!(store.migrate().await.expect("second migrate"), 0);
    store.check_schema().await.expect("schema current after migrate");
    assert_eq!(store.schema_version().await.expect("version"), store.latest_schema_version());
}

async fn hosts_are_added_listed_and_unique(db: TestDb) {
    let store = fleet(&db).await;
    let hosts = store.hosts().await.expect("list");
    assert_eq!(hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["node-a", "node-b", "node-c"]);
    assert!(hosts.iter().all(|h| h.state == HostState::Active && h.last_heartbeat.is_none()));
    let a = store.host(&host("node-a")).await.expect("show").expect("node-a exists");
    assert_eq!(a.mac.map(|m| m.to_string()).as_deref(), Some("52:54:00:00:00:0a"));

    let dup = store.add_host(&new_host("node-a", None), "test").await.expect_err("duplicate name");
    assert!(matches!(dup, StoreError::HostExists(_)), "{dup}");
    let mac = store.add_host(&new_host("node-d", Some("52:54:00:00:00:0A")), "test").await.expect_err("dup MAC");
    assert_eq!(mac.to_string(), "MAC 52:54:00:00:00:0a already belongs to host node-a");
    assert_eq!(store.hosts().await.expect("list").len(), 3, "refused adds change nothing");
    assert!(store.host(&host("node-z")).await.expect("show").is_none());

    let fenced =
        store.set_host_state(&host("node-b"), HostState::Fenced, "test", "BMC power off").await.expect("fence");
    assert_eq!(fenced.state, HostState::Fenced);
    let events = store.events(&EventFilter { host: Some(host("node-b")), ..Default::default() }).await.expect("events");
    assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["host.added", "host.state"]);
}

async fn import_is_all_or_nothing(db: TestDb) {
    let store = fleet(&db).await;
    let mut batch: Vec<_> = (0..10).map(|n| new_instance("node-a", n)).collect();
    batch[5].owner = host("node-x");
    let err = store.import_instances(&batch, "test").await.expect_err("unknown owner");
    assert!(
        matches!(&err, StoreError::Item { index: 5, source } if matches!(**source, StoreError::UnknownHost(_))),
        "{err:?}"
    );
    assert!(store.instances(None).await.expect("list").is_empty(), "nothing imported");

    batch[5].owner = host("node-b");
    batch[7].uuid = batch[2].uuid;
    let err = store.import_instances(&batch, "test").await.expect_err("duplicate in batch");
    assert!(
        matches!(&err, StoreError::Item { index: 7, source } if matches!(**source, StoreError::InstanceExists(_))),
        "{err:?}"
    );
    assert!(store.instances(None).await.expect("list").is_empty(), "nothing imported");

    batch[7].uuid = InstanceId::random();
    assert_eq!(store.import_instances(&batch, "test").await.expect("import"), 10);
    let again = vec![new_instance("node-c", 100), batch[3].clone()];
    let err = store.import_instances(&again, "test").await.expect_err("already in the database");
    assert!(
        matches!(&err, StoreError::Item { index: 1, source } if matches!(**source, StoreError::InstanceExists(_))),
        "{err:?}"
    );
    let all = store.instances(None).await.expect("list");
    assert_eq!(all.len(), 10, "the second import added nothing");
    assert_eq!(store.instances(Some(&host("node-b"))).await.expect("list").len(), 1);
    let one = store.instance(batch[0].uuid).await.expect("get").expect("exists");
    assert_eq!(
        (one.generation, one.ha, one.storage, one.deleted, one.has_domain_xml),
        (Generation(1), true, Storage::Shared, false, true)
    );
    assert_eq!(store.domain_xml(batch[0].uuid).await.expect("xml"), batch[0].domain_xml);
}

async fn import_crosses_batch_boundaries(db: TestDb) {
    let store = fleet(&db).await;
    let batch: Vec<_> = (0..2_500).map(|n| new_instance(["node-a", "node-b"][n % 2], n)).collect();
    assert_eq!(store.import_instances(&batch, "test").await.expect("import"), 2_500);
    assert_eq!(store.instances(None).await.expect("list").len(), 2_500);
    assert_eq!(store.instances(Some(&host("node-a"))).await.expect("list").len(), 1_250);
}

async fn evacuate_bumps_generation_with_an_event(db: TestDb) {
    let store = fleet(&db).await;
    let batch: Vec<_> = (0..3).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let ids: Vec<_> = batch.iter().map(|i| i.uuid).collect();
    store.set_host_state(&host("node-a"), HostState::Fenced, "test", "fenced").await.expect("fence");
    let moved = store.evacuate(&ids[..2], &host("node-b"), false, "test").await.expect("evacuate");
    assert!(moved.iter().all(|t| t.moved && t.generation == Generation(2) && t.from == host("node-a")));
    let after = store.instance(ids[0]).await.expect("get").expect("exists");
    assert_eq!((after.owner.as_str(), after.generation), ("node-b", Generation(2)));
    assert_eq!(store.instance(ids[2]).await.expect("get").expect("exists").generation, Generation(1));

    // Evacuating to where it already is changes nothing.
    let again = store.evacuate(&ids[..1], &host("node-b"), false, "test").await.expect("no-op evacuate");
    assert!(!again[0].moved && again[0].generation == Generation(2));
    let events = store.events(&EventFilter { instance: Some(ids[0]), ..Default::default() }).await.expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, "instance.moved");
    assert!(events[0].message.contains("from node-a to node-b (generation 2)"), "{}", events[0].message);
}

async fn evacuate_refuses_bad_requests_and_changes_nothing(db: TestDb) {
    let store = fleet(&db).await;
    let batch: Vec<_> = (0..3).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let ids: Vec<_> = batch.iter().map(|i| i.uuid).collect();
    let before = store.instances(None).await.expect("list");

    let err = store.evacuate(&ids, &host("node-x"), false, "test").await.expect_err("unknown host");
    assert_eq!(err.to_string(), "unknown host node-x");
    // node-a is active: its instances may be running there.
    let err = store.evacuate(&ids[..1], &host("node-b"), false, "test").await.expect_err("live source");
    assert!(
        matches!(&err, StoreError::Item { index: 0, source } if matches!(**source, StoreError::SourceLive { .. })),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some_and(|e| e.to_string().contains("--force")), "{err:?}");
    let stranger = InstanceId::random();
    store.set_host_state(&host("node-a"), HostState::Fenced, "test", "fenced").await.expect("fence");
    let err = store.evacuate(&[ids[0], stranger], &host("node-b"), false, "test").await.expect_err("unknown instance");
    assert!(
        matches!(&err, StoreError::Item { index: 1, source } if matches!(**source, StoreError::UnknownInstance(_))),
        "{err:?}"
    );
    store.set_host_state(&host("node-c"), HostState::Fenced, "test", "fenced").await.expect("fence");
    let err = store.evacuate(&ids, &host("node-c"), false, "test").await.expect_err("fenced target");
    assert_eq!(err.to_string(), "host node-c is fenced, not active");
    store.delete_instances(&ids[2..], "test").await.expect("delete");
    let err = store.evacuate(&ids, &host("node-b"), false, "test").await.expect_err("deleted instance");
    assert!(
        matches!(&err, StoreError::Item { index: 2, source } if matches!(**source, StoreError::InstanceDeleted(_))),
        "{err:?}"
    );

    let after = store.instances(None).await.expect("list");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.owner, b.generation), (&a.owner, a.generation), "{}", a.uuid);
    }
}

async fn evacuate_moves_off_a_live_host_only_when_it_is_known_stopped_or_forced(db: TestDb) {
    let store = fleet(&db).await;
    let batch: Vec<_> = (0..2).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let (running, stopped) = (batch[0].uuid, batch[1].uuid);
    let refused = |r: Result<Vec<_>, StoreError>| matches!(r, Err(StoreError::Item { source, .. }) if matches!(*source, StoreError::SourceLive { .. }));
    let report = |running_too: bool| {
        vec![
            ReportedDomain {
                uuid: running,
                running: running_too,
                generation: Some(Generation(1)),
                migration_failed: None,
            },
            ReportedDomain { uuid: stopped, running: false, generation: Some(Generation(1)), migration_failed: None },
        ]
    };
    // A report from before the host entered maintenance proves nothing about now.
    store.save_guard_report(&host("node-a"), &report(true)).await.expect("report");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.set_host_state(&host("node-a"), HostState::Maintenance, "test", "planned work").await.expect("maintenance");
    assert!(refused(store.evacuate(&[stopped], &host("node-b"), false, "test").await), "report older than maintenance");
    // The guard reports again in maintenance: one still runs, the other is stopped.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.save_guard_report(&host("node-a"), &report(true)).await.expect("report");
    assert!(refused(store.evacuate(&[running], &host("node-b"), false, "test").await), "still running there");
    assert!(refused(store.evacuate(&[stopped, running], &host("node-b"), false, "test").await), "all or nothing");
    assert_eq!(store.instance(stopped).await.expect("get").expect("exists").owner, host("node-a"));
    let moved = store.evacuate(&[stopped], &host("node-b"), false, "test").await.expect("stopped there");
    assert!(moved[0].moved);
    // --force moves the running one, and its event says what it risks.
    let forced = store.evacuate(&[running], &host("node-b"), true, "test").await.expect("forced");
    assert!(forced[0].moved && forced[0].generation == Generation(2));
    let events = store.events(&EventFilter { instance: Some(running), ..Default::default() }).await.expect("events");
    assert!(events.iter().any(|e| e.message.contains("--force") && e.message.contains("may run twice")), "{events:?}");
}

async fn stale_generation_is_a_conflict(db: TestDb) {
    let store = fleet(&db).await;
    let vm = new_instance("node-a", 0);
    store.import_instances(std::slice::from_ref(&vm), "test").await.expect("import");
    let g = store.transfer_owner(vm.uuid, Generation(1), &host("node-b"), "test", "failover").await.expect("move");
    assert_eq!(g, Generation(2));
    let err =
        store.transfer_owner(vm.uuid, Generation(1), &host("node-c"), "test", "failover").await.expect_err("stale");
    assert!(matches!(err, StoreError::Conflict { expected: Generation(1), found: Generation(2), .. }), "{err}");
    let err = store
        .transfer_owner(InstanceId::random(), Generation(1), &host("node-c"), "test", "x")
        .await
        .expect_err("unknown");
    assert!(matches!(err, StoreError::UnknownInstance(_)), "{err}");
    let err =
        store.transfer_owner(vm.uuid, Generation(2), &host("node-x"), "test", "x").await.expect_err("unknown host");
    assert!(matches!(err, StoreError::UnknownHost(_)), "{err}");
    let now = store.instance(vm.uuid).await.expect("get").expect("exists");
    assert_eq!((now.owner.as_str(), now.generation), ("node-b", Generation(2)));
}

/// Several recoveries in one transaction: each a compare-and-set of its own (one that lost
/// its race, was deleted or is unknown fails alone), all or none when the database refuses.
async fn batched_recoveries_fail_one_by_one_or_all_at_once(db: TestDb) {
    let store = fleet(&db).await;
    let vms: Vec<NewInstance> = (0..4).map(|i| new_instance("node-a", i)).collect();
    store.import_instances(&vms, "test").await.expect("import");
    // vms[1] moved by someone else meanwhile; vms[2] deleted.
    store.transfer_owner(vms[1].uuid, Generation(1), &host("node-c"), "test", "other").await.expect("move");
    store.delete_instances(&[vms[2].uuid], "test").await.expect("delete");
    let mv = |id: InstanceId, to: &str| OwnerMove {
        id,
        expected: Generation(1),
        from: host("node-a"),
        to: host(to),
        reason: "recovered from fenced host node-a".into(),
    };
    let unknown = InstanceId::random();
    let moves = [
        mv(vms[0].uuid, "node-b"),
        mv(vms[1].uuid, "node-b"),
        mv(vms[2].uuid, "node-b"),
        mv(unknown, "node-b"),
        mv(vms[3].uuid, "node-c"),
    ];
    let out = store.transfer_owners(&moves, "test").await.expect("batch");
    assert!(matches!(out[0], Ok(Generation(2))), "{out:?}");
    assert!(matches!(out[1], Err(StoreError::Conflict { found: Generation(2), .. })), "{out:?}");
    assert!(matches!(out[2], Err(StoreError::InstanceDeleted(_))), "{out:?}");
    assert!(matches!(out[3], Err(StoreError::UnknownInstance(id)) if id == unknown), "{out:?}");
    assert!(matches!(out[4], Ok(Generation(2))), "{out:?}");
    for (i, owner, relocations) in [(0, "node-b", 1), (1, "node-c", 1), (3, "node-c", 1)] {
        let now = store.instance(vms[i].uuid).await.expect("get").expect("exists");
        assert_eq!(now.owner, host(owner), "vm {i}");
        let policy = store.instance_policies().await.expect("policies");
        assert_eq!(policy.get(&vms[i].uuid).map_or(0, |p| p.relocations), relocations, "vm {i}");
    }
    let events =
        store.events(&EventFilter { instance: Some(vms[0].uuid), ..Default::default() }).await.expect("events");
    assert!(events.iter().any(|e| e.kind == "instance.moved" && e.message.contains("node-b")), "{events:?}");
    // A target that does not exist refuses the whole batch: nothing moved.
    let moves = [mv(vms[0].uuid, "node-c"), mv(vms[3].uuid, "node-x")];
    let moves = [
        OwnerMove { expected: Generation(2), ..moves[0].clone() },
        OwnerMove { expected: Generation(2), ..moves[1].clone() },
    ];
    let err = store.transfer_owners(&moves, "test").await.expect_err("unknown host");
    assert!(matches!(err, StoreError::UnknownHost(_)), "{err}");
    let now = store.instance(vms[0].uuid).await.expect("get").expect("exists");
    assert_eq!((now.owner, now.generation), (host("node-b"), Generation(2)), "nothing of the batch was written");
}

/// Detection's batches: suspects marked in one transaction (one that is no longer active is
/// left alone), fences started in one (not twice, not for an unknown host).
async fn hosts_marked_and_operations_started_in_batches(db: TestDb) {
    let store = fleet(&db).await;
    store.set_host_state(&host("node-c"), HostState::Maintenance, "test", "planned").await.expect("maintenance");
    let changes: Vec<(HostName, String)> =
        ["node-a", "node-b", "node-c"].iter().map(|h| (host(h), format!("{h} silent"))).collect();
    let changed =
        store.set_hosts_state_from(&changes, HostState::Active, HostState::Suspect, "test").await.expect("batch");
    assert_eq!(changed, 2);
    for (h, state) in
        [("node-a", HostState::Suspect), ("node-b", HostState::Suspect), ("node-c", HostState::Maintenance)]
    {
        assert_eq!(store.host(&host(h)).await.expect("get").expect("host").state, state, "{h}");
    }
    let events = store.events(&EventFilter::default()).await.expect("events");
    assert!(events.iter().any(|e| e.message == "host node-b: active -> suspect: node-b silent"), "{events:?}");
    let (_, first) = store.start_operation("fence", &host("node-b"), "confirm", None, "{}", "test").await.expect("op");
    assert!(first);
    let starts: Vec<(HostName, String, String)> = ["node-a", "node-b", "node-x"]
        .iter()
        .map(|h| (h.parse().expect("name"), "confirm".to_owned(), "{}".to_owned()))
        .collect();
    let started = store.start_operations("fence", &starts, "test").await.expect("batch");
    assert_eq!(
        started.iter().map(Option::is_some).collect::<Vec<_>>(),
        [true, false, false],
        "node-b's runs already; node-x does not exist"
    );
    let running = store.running_operations("fence").await.expect("running");
    assert_eq!(running.iter().map(|o| o.target.as_str()).collect::<Vec<_>>(), ["node-b", "node-a"]);
    assert_eq!(started[0], Some(running[1].id), "the new operation's id");
    let events = store.events(&EventFilter::default()).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "fence.started").count(), 2, "{events:?}");
    // Their steps in one transaction, each a compare-and-set of its own: node-a's from a step
    // it is not at changes nothing; node-b's goes on, and one ends.
    let step = |id: i64, from: &str, to: &str, status: OperationStatus| {
        let change = nodekeeper_store::StepChange {
            from: from.into(),
            to: to.into(),
            status,
            attempts: 0,
            deadline: None,
            last_error: None,
            data: Some(format!("{{\"at\":\"{to}\"}}")),
            event: format!("operation {id}: {from} -> {to}"),
        };
        (id, change, "test")
    };
    let (a, b) = (running[1].id, running[0].id);
    let changes = [
        step(a, "power_off", "evacuate", OperationStatus::Running),
        step(b, "confirm", "power_off", OperationStatus::Running),
    ];
    let done = store.advance_operations(&changes).await.expect("batch");
    assert!(done[0].is_none(), "node-a is at confirm, not power_off");
    assert_eq!(
        done[1].as_ref().map(|o| (o.step.as_str(), o.data.as_str())),
        Some(("power_off", "{\"at\":\"power_off\"}"))
    );
    let done = store
        .advance_operations(&[
            step(b, "power_off", "done", OperationStatus::Done),
            step(a, "confirm", "power_off", OperationStatus::Running),
        ])
        .await
        .expect("batch");
    assert_eq!(
        done.iter().map(|o| o.as_ref().map(|o| o.status)).collect::<Vec<_>>(),
        [Some(OperationStatus::Done), Some(OperationStatus::Running)]
    );
    let events = store.events(&EventFilter::default()).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "fence.step").count(), 2, "{events:?}");
    assert_eq!(events.iter().filter(|e| e.kind == "fence.done").count(), 1, "{events:?}");
    assert!(!events.iter().any(|e| e.message.contains("power_off -> evacuate")), "the lost one left no event");
}

/// Eight real connections race to move one instance from the same generation: one wins.
async fn concurrent_evacuations_cannot_both_win(db: TestDb) {
    let store = fleet(&db).await;
    let vm = new_instance("node-a", 0);
    store.import_instances(std::slice::from_ref(&vm), "test").await.expect("import");
    for round in 0..5u64 {
        let expected = Generation(1 + round);
        let barrier = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let to = host(["node-b", "node-c", "node-a"][i % 3]);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.transfer_owner(vm.uuid, expected, &to, "test", "race").await.map(|g| (g, to))
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(win) => winners.push(win),
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner, got {winners:?}");
        let now = store.instance(vm.uuid).await.expect("get").expect("exists");
        assert_eq!((now.generation, &now.owner), (expected.next(), &winners[0].1), "round {round}");
    }
}

async fn delete_keeps_a_tombstone(db: TestDb) {
    let store = fleet(&db).await;
    let vm = new_instance("node-a", 0);
    store.import_instances(std::slice::from_ref(&vm), "test").await.expect("import");
    let gone = store.delete_instances(&[vm.uuid], "test").await.expect("delete");
    assert!(gone[0].deleted);
    store.delete_instances(&[vm.uuid], "test").await.expect("delete is idempotent");
    let row = store.instance(vm.uuid).await.expect("get").expect("the row is kept");
    assert!(row.deleted);
    assert_eq!(store.domain_xml(vm.uuid).await.expect("xml"), vm.domain_xml, "the XML is kept");
    let events = store.events(&EventFilter { instance: Some(vm.uuid), ..Default::default() }).await.expect("events");
    assert_eq!(events.len(), 1, "the second delete recorded nothing");
    let err = store.delete_instances(&[vm.uuid, InstanceId::random()], "test").await.expect_err("unknown");
    assert!(matches!(&err, StoreError::Item { index: 1, .. }), "{err:?}");
}

async fn ownership_lookup_is_batched(db: TestDb) {
    let store = fleet(&db).await;
    let batch: Vec<_> = (0..4_500).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let mut ids: Vec<_> = batch.iter().map(|i| i.uuid).collect();
    ids.extend((0..600).map(|_| InstanceId::random()));
    let found = store.ownership(&ids).await.expect("lookup");
    assert_eq!(found.len(), 4_500);
    assert!(found.iter().all(|o| o.owner == host("node-a") && o.generation == Generation(1) && !o.deleted));
}

#[tokio::test]
async fn a_database_that_is_down_is_named_without_its_password() {
    // Port 1 on loopback: nothing listens there.
    let err = Store::connect("postgres://nk:hunter2@127.0.0.1:1/nodekeeper").await.expect_err("down");
    let msg = format!("{err}");
    assert_eq!(msg, "cannot connect to database postgres://nk:***@127.0.0.1:1/nodekeeper");
    let chain = format!("{:?}", anyhow_like_chain(&err));
    assert!(!chain.contains("hunter2"), "{chain}");
}

#[tokio::test]
async fn malformed_urls_are_refused_before_connecting() {
    for url in ["mysql://x@y/z", "sqlite:", "postgres://nk:hunter2@db:notaport/nk", "://"] {
        let err = Store::connect(url).await.expect_err(url);
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}: {err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

fn anyhow_like_chain(err: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out
}

async fn keyed_events_are_recorded_once(db: TestDb) {
    let store = fleet(&db).await;
    let a = host("node-a");
    let batch: Vec<NewEvent> = (0..1_500)
        .map(|i| {
            NewEvent::instance("test", "instance.quarantined", &a, InstanceId::random(), format!("q{i}"))
                .with_key(format!("quarantine:node-a:{i}"))
        })
        .chain([NewEvent::host("test", "note", &a, "unkeyed".into())])
        .collect();
    store.record_events(&batch).await.expect("first");
    store.record_events(&batch).await.expect("replay");
    let events =
        store.events(&EventFilter { host: Some(a), limit: Some(10_000), ..Default::default() }).await.expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "instance.quarantined").count(), 1_500, "keyed: once");
    assert_eq!(events.iter().filter(|e| e.kind == "note").count(), 2, "unkeyed: every time");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "instance.quarantined")
            .map(|e| e.message.as_str())
            .take(2)
            .collect::<Vec<_>>(),
        ["q0", "q1"]
    );
}

async fn deploy_tokens_are_single_use_and_expire(db: TestDb) {
    use nodekeeper_store::Timestamp;
    let store = fleet(&db).await;
    let a = host("node-a");
    let mac = "52:54:00:00:00:0a".parse().expect("mac");
    assert_eq!(store.host_by_mac(mac).await.expect("by mac").map(|h| h.name), Some(a.clone()));
    assert!(store.host_by_mac("52:54:00:ff:ff:ff".parse().expect("mac")).await.expect("by mac").is_none());

    let later = Timestamp(Timestamp::now().0 + 60_000);
    assert!(store.issue_deploy_token(&a, "aaaa", later, "1:1").await.expect("issue"));
    assert!(!store.check_deploy_token(&a, "bbbb", false).await.expect("check"), "wrong token");
    assert!(!store.check_deploy_token(&host("node-b"), "aaaa", false).await.expect("check"), "other host");
    assert!(store.check_deploy_token(&a, "aaaa", false).await.expect("check"), "valid, not burnt");
    // A second fetch in the same boot gets nothing, and the first token stands.
    assert!(!store.issue_deploy_token(&a, "ffff", later, "1:1").await.expect("issue again"), "same boot");
    assert!(!store.check_deploy_token(&a, "ffff", false).await.expect("check"), "not issued");
    assert!(store.check_deploy_token(&a, "aaaa", true).await.expect("burn"), "valid, burnt now");
    assert!(!store.check_deploy_token(&a, "aaaa", true).await.expect("burn"), "single use");
    assert!(!store.issue_deploy_token(&a, "ffff", later, "1:1").await.expect("issue"), "burnt is not reissued");

    // Expired by the database's clock (the one tokens are checked against), not this process's.
    let past = Timestamp(store.now().await.expect("now").0 - 1000);
    assert!(store.issue_deploy_token(&a, "cccc", past, "1:2").await.expect("expired"));
    assert!(!store.check_deploy_token(&a, "cccc", false).await.expect("check"), "expired");
    assert!(store.issue_deploy_token(&a, "eeee", later, "1:3").await.expect("next boot"));
    store.clear_deploy_token(&a).await.expect("clear");
    assert!(!store.check_deploy_token(&a, "eeee", false).await.expect("check"), "cleared");
    assert!(!store.issue_deploy_token(&host("node-x"), "dddd", later, "9:1").await.expect("unknown host"));
    store.ping().await.expect("ping");
}

async fn leases_move_between_macs_and_survive(db: TestDb) {
    use nodekeeper_store::{Lease, Timestamp};
    let store = db.store().await;
    let mac = |n: u8| format!("52:54:00:00:01:{n:02x}").parse().expect("mac");
    let ip = |n: u8| std::net::Ipv4Addr::new(10, 20, 0, n);
    let t = Timestamp(1_000);
    let batch: Vec<Lease> = (1..=200u8).map(|n| Lease { mac: mac(n), ip: ip(n), expires_at: t }).collect();
    store.save_leases(&batch).await.expect("save");
    // .5 moves to a new MAC; mac 7 renews onto another address; within one batch the last wins.
    store
        .save_leases(&[
            Lease { mac: mac(250), ip: ip(5), expires_at: t },
            Lease { mac: mac(7), ip: ip(240), expires_at: t },
            Lease { mac: mac(7), ip: ip(241), expires_at: Timestamp(2_000) },
        ])
        .await
        .expect("save");
    store.delete_lease(mac(9)).await.expect("release");
    store.delete_lease(mac(9)).await.expect("release is idempotent");
    let reopened = Store::connect(db.url()).await.expect("reconnect");
    let mut leases = reopened.leases().await.expect("leases");
    leases.sort_by_key(|l| l.ip);
    assert_eq!(leases.len(), 199);
    assert_eq!(leases.iter().filter(|l| l.ip == ip(5)).map(|l| l.mac).collect::<Vec<_>>(), vec![mac(250)]);
    assert!(!leases.iter().any(|l| l.mac == mac(5)), "the old holder lost .5");
    assert_eq!(
        leases.iter().find(|l| l.mac == mac(7)).map(|l| (l.ip, l.expires_at)),
        Some((ip(241), Timestamp(2_000)))
    );
    assert!(!leases.iter().any(|l| l.mac == mac(9)));
}

async fn operations_are_unique_per_target_and_advance_by_compare_and_set(db: TestDb) {
    use nodekeeper_store::{OperationStatus, StepChange, Timestamp};
    let store = fleet(&db).await;
    let a = host("node-a");
    // Eight concurrent starts on one host: one operation.
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move {
                store.start_operation("reimage", &a, "power_off", Some(Timestamp(10)), "{}", "test").await
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut fresh = 0;
    for s in starts {
        let (op, started) = s.await.expect("task").expect("start");
        ids.push(op.id);
        fresh += usize::from(started);
    }
    assert_eq!(fresh, 1, "exactly one start creates it");
    assert!(ids.iter().all(|&i| i == ids[0]), "everyone gets the running one: {ids:?}");
    let id = ids[0];
    let change = |from: &str, to: &str, status| StepChange {
        from: from.into(),
        to: to.into(),
        status,
        attempts: 0,
        deadline: Some(Timestamp(20)),
        last_error: None,
        data: Some("{\"x\":1}".into()),
        event: format!("{from} -> {to}"),
    };
    let op = store
        .advance_operation(id, &change("power_off", "pxe_next_boot", OperationStatus::Running), "test")
        .await
        .expect("advance")
        .expect("applied");
    assert_eq!((op.step.as_str(), op.data.as_str(), op.deadline), ("pxe_next_boot", "{\"x\":1}", Some(Timestamp(20))));
    // A stale executor still at power_off changes nothing.
    assert!(store
        .advance_operation(id, &change("power_off", "pxe_next_boot", OperationStatus::Running), "test")
        .await
        .expect("advance")
        .is_none());
    assert_eq!(store.running_operations("reimage").await.expect("running").len(), 1);
    let done = store
        .advance_operation(id, &change("pxe_next_boot", "done", OperationStatus::Done), "test")
        .await
        .expect("advance")
        .expect("applied");
    assert_eq!(done.status, OperationStatus::Done);
    assert!(store.running_operations("reimage").await.expect("running").is_empty());
    assert_eq!(store.latest_operation(&a).await.expect("latest").map(|o| o.id), Some(id));
    // Ended: a new request starts a new operation.
    let (again, started) = store.start_operation("reimage", &a, "power_off", None, "{}", "test").await.expect("start");
    assert!(started && again.id != id);
    let kinds: Vec<String> = store
        .events(&EventFilter { host: Some(a), ..Default::default() })
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "reimage.started").count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"reimage.step".to_string()) && kinds.contains(&"reimage.done".to_string()), "{kinds:?}");
    let err = store
        .start_operation("reimage", &host("node-x"), "power_off", None, "{}", "test")
        .await
        .expect_err("unknown host");
    assert!(matches!(err, StoreError::UnknownHost(_)));
}

async fn a_writer_under_a_lost_lease_changes_nothing(db: TestDb) {
    let store = fleet(&db).await;
    let (op, _) = store.start_operation("fence", &host("node-a"), "confirm", None, "{}", "test").await.expect("op");
    let a = store.acquire_leadership("controller", "replica-a", 200).await.expect("a");
    let as_a = store.under_lease(a.token());
    as_a.check_lease().await.expect("a leads");
    let step = |from: &str, to: &str| nodekeeper_store::StepChange {
        from: from.into(),
        to: to.into(),
        status: nodekeeper_store::OperationStatus::Running,
        attempts: 0,
        deadline: None,
        last_error: None,
        data: None,
        event: format!("{from} -> {to}"),
    };
    assert!(as_a.advance_operation(op.id, &step("confirm", "power_off"), "a").await.expect("a steps").is_some());
    // a pauses past its lease; b takes the role in a new term.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = store.acquire_leadership("controller", "replica-b", 60_000).await.expect("b");
    assert_eq!((b.holder.as_str(), b.term), ("replica-b", 2));
    // a wakes: every write it tries is refused by the database, and it learns why.
    let lost = |r: Result<_, StoreError>| matches!(r, Err(StoreError::LeaseLost { term: 1, .. }));
    assert!(lost(as_a.check_lease().await));
    assert!(lost(as_a.advance_operation(op.id, &step("power_off", "evacuate"), "a").await.map(drop)));
    assert!(lost(as_a.set_host_state(&host("node-a"), HostState::Fenced, "a", "stale").await.map(drop)));
    assert!(lost(as_a.start_operation("fence", &host("node-b"), "confirm", None, "{}", "a").await.map(drop)));
    assert!(lost(as_a.clear_deploy_token(&host("node-a")).await));
    assert!(lost(as_a.set_host_image(&host("node-a"), "stale.img").await));
    assert!(lost(as_a.record_event(&NewEvent::host("a", "test.stale", &host("node-a"), "stale".into())).await));
    // The drain's and the services' writes too: no hold, no move of a held instance, no copy.
    store.import_instances(&[new_instance("node-a", 0)], "test").await.expect("import");
    let vm = store.instances(Some(&host("node-a"))).await.expect("list")[0].uuid;
    assert!(lost(as_a.hold_instances(&host("node-a"), &[vm], true, "a", "stale").await.map(drop)));
    store.hold_instances(&host("node-a"), &[vm], true, "test", "held").await.expect("held by the CLI's store");
    let g = store.instance(vm).await.expect("read").expect("vm").generation;
    assert!(lost(as_a.transfer_held(vm, g, &host("node-b"), "a", "stale").await.map(drop)));
    let svc = nodekeeper_store::Service {
        name: "svc".into(),
        copies: 1,
        labels: vec![],
        start: vec!["true".into()],
        stop: vec!["true".into()],
        check: None,
        exclusive: true,
    };
    store.put_service(&svc, "test").await.expect("service");
    let place = nodekeeper_store::CopyChange::Place { service: "svc".into(), slot: 0, host: host("node-b") };
    assert!(lost(as_a.change_service_copy(&place, "a").await.map(drop)));
    assert!(store.service_copies(None).await.expect("copies").is_empty(), "no copy placed by the stale leader");
    assert_eq!(store.instance(vm).await.expect("read").expect("vm").owner, host("node-a"), "not moved");
    let now = store.operation(op.id).await.expect("read").expect("exists");
    assert_eq!(now.step, "power_off", "the stale leader's step change was refused");
    assert_eq!(store.require_host(&host("node-a")).await.expect("host").state, HostState::Active);
    // b, in the current term, acts; a store under no lease is not fenced (the CLI).
    let as_b = store.under_lease(b.token());
    assert!(as_b.advance_operation(op.id, &step("power_off", "evacuate"), "b").await.expect("b steps").is_some());
    store.set_host_state(&host("node-a"), HostState::Maintenance, "cli", "operator").await.expect("cli");
}

async fn time_is_the_database_servers(db: TestDb) {
    use nodekeeper_store::Timestamp;
    let store = fleet(&db).await;
    let before = store.now().await.expect("now");
    let at = store.record_heartbeat(&host("node-a")).await.expect("heartbeat");
    let after = store.now().await.expect("now");
    assert!(before <= at && at <= after, "{before:?} {at:?} {after:?}");
    // The server runs on this machine here, so its clock agrees with ours (within slack);
    // the guard test runs a guard whose own clock is a minute off.
    let skew = (store.now().await.expect("now").0 - Timestamp::now().0).abs();
    assert!(skew < 2_000, "database clock {skew} ms from ours");
    let host = store.require_host(&host("node-a")).await.expect("host");
    assert_eq!(host.last_heartbeat, Some(at));
}

async fn peers_are_the_watched_hosts_with_an_address_and_a_key_per_pair(db: TestDb) {
    use nodekeeper_store::{guard_api::peer_key, Lease, Timestamp};
    let store = db.store().await;
    let add = |name: &str, mac: &str, ip: Option<&str>| NewHost {
        name: host(name),
        mac: Some(mac.parse().expect("mac")),
        ip: ip.map(|i| i.parse().expect("ip")),
        bmc_url: None,
        bmc_credentials: None,
    };
    for h in [
        add("node-a", "52:54:00:00:00:0a", Some("10.0.0.1")),
        add("node-b", "52:54:00:00:00:0b", Some("10.0.0.2")),
        add("node-c", "52:54:00:00:00:0c", None),             // leased
        add("node-d", "52:54:00:00:00:0d", None),             // no address at all
        add("node-e", "52:54:00:00:00:0e", Some("10.0.0.5")), // never heartbeated
        add("node-f", "52:54:00:00:00:0f", Some("10.0.0.6")), // in maintenance
    ] {
        store.add_host(&h, "test").await.expect("host");
    }
    for h in ["node-a", "node-b", "node-c", "node-d", "node-f"] {
        store.record_heartbeat(&host(h)).await.expect("heartbeat");
    }
    store.set_host_state(&host("node-f"), HostState::Maintenance, "test", "work").await.expect("state");
    let lease = Lease {
        mac: "52:54:00:00:00:0c".parse().expect("mac"),
        ip: "10.0.0.3".parse().expect("ip"),
        expires_at: Timestamp(i64::MAX / 2),
    };
    store.save_leases(&[lease]).await.expect("lease");
    let secret = store.cell_secret().await.expect("secret");
    assert_eq!(store.cell_secret().await.expect("again"), secret, "made once");
    assert_eq!(secret.len(), 64);
    let list = store.peers_of(&host("node-a")).await.expect("peers");
    let got: Vec<(String, String)> = list.peers.iter().map(|p| (p.host.to_string(), p.address.to_string())).collect();
    assert_eq!(got, [("node-b".to_string(), "10.0.0.2".to_string()), ("node-c".into(), "10.0.0.3".into())]);
    assert_eq!(list.cell_size, 3);
    assert_eq!(list.peers[0].key, peer_key(&secret, &host("node-b"), &host("node-a")), "shared by the pair");
    // A suspect peer is asked, not counted: dead suspects must not outvote the living.
    store.set_host_state(&host("node-c"), HostState::Suspect, "test", "silent").await.expect("suspect");
    let with_suspect = store.peers_of(&host("node-a")).await.expect("peers");
    assert_eq!((with_suspect.peers.len(), with_suspect.cell_size), (2, 2));
    store.set_host_state(&host("node-c"), HostState::Active, "test", "back").await.expect("active");
    let of_b = store.peers_of(&host("node-b")).await.expect("peers");
    assert_eq!(
        of_b.peers.iter().find(|p| p.host == host("node-a")).map(|p| p.key.clone()),
        Some(list.peers[0].key.clone())
    );
    // A large cell: a stable subset of 64 per host, the cell counted whole.
    for i in 0..100 {
        let h = NewHost {
            name: host(&format!("big-{i:03}")),
            mac: None,
            ip: Some(format!("10.1.0.{}", i + 1).parse().expect("ip")),
            bmc_url: None,
            bmc_credentials: None,
        };
        store.add_host(&h, "test").await.expect("host");
        store.record_heartbeat(&h.name).await.expect("heartbeat");
    }
    let big = store.peers_of(&host("big-000")).await.expect("peers");
    assert_eq!(big.cell_size, 103);
    assert!((32..=96).contains(&big.peers.len()), "about 64: {}", big.peers.len());
    for p in &big.peers {
        let theirs = store.peers_of(&p.host).await.expect("peers");
        assert!(theirs.peers.iter().any(|q| q.host == host("big-000")), "{} lists big-000 back", p.host);
    }
    assert_eq!(store.peers_of(&host("big-000")).await.expect("again"), big, "the same subset each time");
    let other = store.peers_of(&host("big-001")).await.expect("peers");
    assert_ne!(
        other.peers.iter().map(|p| &p.host).collect::<Vec<_>>(),
        big.peers.iter().map(|p| &p.host).collect::<Vec<_>>()
    );
}

async fn leadership_is_held_renewed_and_taken_over_only_after_expiry(db: TestDb) {
    use nodekeeper_store::Timestamp;
    let store = db.store().await;
    assert!(store.leadership("controller").await.expect("read").is_none(), "nobody yet");
    let a = store.acquire_leadership("controller", "replica-a", 60_000).await.expect("a");
    assert_eq!(store.leadership("controller").await.expect("read").map(|l| l.holder), Some("replica-a".into()));
    assert!(a.held_by("replica-a", Timestamp::now()) && a.term == 1, "{a:?}");
    let b = store.acquire_leadership("controller", "replica-b", 60_000).await.expect("b");
    assert!(!b.held_by("replica-b", Timestamp::now()), "taken while held: {b:?}");
    assert_eq!((b.holder.as_str(), b.term), ("replica-a", 1));
    let renewed = store.acquire_leadership("controller", "replica-a", 60_000).await.expect("renew");
    assert!(renewed.term == 1 && renewed.expires_at >= a.expires_at, "{renewed:?}");
    // Another role is independent.
    assert!(store
        .acquire_leadership("gc", "replica-b", 60_000)
        .await
        .expect("gc")
        .held_by("replica-b", Timestamp::now()));

    // replica-a stops renewing: once expired, replica-b takes over, in a new term.
    store.acquire_leadership("controller", "replica-a", 1).await.expect("short");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let b = store.acquire_leadership("controller", "replica-b", 60_000).await.expect("take over");
    assert!(b.held_by("replica-b", Timestamp::now()) && b.term == 2, "{b:?}");
    let a = store.acquire_leadership("controller", "replica-a", 60_000).await.expect("a again");
    assert!(!a.held_by("replica-a", Timestamp::now()), "the old leader cannot come back while b renews");

    // A clean release hands over at once.
    store.release_leadership("controller", "replica-b").await.expect("release");
    let a = store.acquire_leadership("controller", "replica-a", 60_000).await.expect("a after release");
    assert!(a.held_by("replica-a", Timestamp::now()) && a.term == 3, "{a:?}");

    // Racing replicas for a free role: exactly one wins.
    store.release_leadership("controller", "replica-a").await.expect("release");
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.acquire_leadership("controller", &format!("r{i}"), 60_000).await })
        })
        .collect();
    let mut winners = std::collections::HashSet::new();
    for r in racers {
        let l = r.await.expect("join").expect("acquire");
        winners.insert(l.holder);
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
}

async fn followers_read_events_in_order_from_an_id(db: TestDb) {
    let store = db.store().await;
    assert_eq!(store.last_event_id().await.expect("last"), 0, "no events yet");
    store.add_host(&new_host("node-a", None), "test").await.expect("host");
    for i in 0..5 {
        store.record_event(&NewEvent::host("test", "test.n", &host("node-a"), format!("n{i}"))).await.expect("event");
    }
    let last = store.last_event_id().await.expect("last");
    let all = store.events_after(0, None, 100).await.expect("all");
    assert_eq!(all.len(), 6, "host.added and five");
    assert_eq!(all.last().map(|e| e.id), Some(last));
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ascending");
    // Pages of two from an id: nothing skipped, nothing twice.
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let page = store.events_after(after, Some(&host("node-a")), 2).await.expect("page");
        let Some(e) = page.last() else { break };
        after = e.id;
        seen.extend(page.iter().map(|e| e.id));
    }
    assert_eq!(seen, all.iter().map(|e| e.id).collect::<Vec<_>>());
    assert!(store.events_after(last, None, 10).await.expect("none").is_empty());
}

/// A follower that polls by id while a large batch and small events are written at once
/// sees every event: ids become visible in order (on PostgreSQL they are handed out at
/// insert, not at commit; event writers are serialized so none commits past an earlier one).
async fn a_follower_misses_no_event_while_writers_race(db: TestDb) {
    let store = fleet(&db).await;
    let start = store.last_event_id().await.expect("last");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut after, mut seen) = (start, Vec::new());
            loop {
                let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                let batch = store.events_after(after, None, 100_000).await.expect("follow");
                for e in &batch {
                    after = e.id;
                    seen.push(e.id);
                }
                if done && batch.is_empty() {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    for round in 0..3 {
        let big: Vec<NewEvent> = (0..5_000)
            .map(|i| NewEvent::host("test", "test.batch", &host("node-a"), format!("round {round} event {i}")))
            .collect();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move { store.record_events(&big).await })
        };
        for i in 0..20 {
            let e = NewEvent::host("test", "test.small", &host("node-b"), format!("round {round} small {i}"));
            store.record_event(&e).await.expect("small");
        }
        writer.await.expect("join").expect("batch");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = follower.await.expect("follower");
    let all: Vec<i64> = store.events_after(start, None, 100_000).await.expect("all").iter().map(|e| e.id).collect();
    assert_eq!(all.len(), 3 * 5_020);
    assert_eq!(seen.len(), all.len(), "the follower missed {} events", all.len() - seen.len());
    assert_eq!(seen, all, "in order, each once");
}

async fn host_state_compare_and_set_changes_only_from_the_expected_state(db: TestDb) {
    let store = db.store().await;
    store.add_host(&new_host("node-a", None), "test").await.expect("host");
    let a = host("node-a");
    let moved = store.set_host_state_from(&a, HostState::Active, HostState::Suspect, "c", "silent").await.expect("cas");
    assert_eq!(moved.map(|h| h.state), Some(HostState::Suspect));
    // An operator puts it in maintenance; the controller's next "recovered" finds it changed.
    store.set_host_state(&a, HostState::Maintenance, "op", "repair").await.expect("maintenance");
    let lost = store.set_host_state_from(&a, HostState::Suspect, HostState::Active, "c", "back").await.expect("cas");
    assert!(lost.is_none());
    assert_eq!(store.require_host(&a).await.expect("host").state, HostState::Maintenance);
    let events =
        store.events(&EventFilter { host: Some(a), limit: Some(100), ..Default::default() }).await.expect("events");
    assert_eq!(
        events.iter().filter(|e| e.kind == "host.state").count(),
        2,
        "no event for the change that did not happen"
    );
}

fn new_image(name: &str) -> NewImage {
    NewImage {
        name: name.to_owned(),
        source_format: ImageFormat::Qcow2,
        file: format!("catalogue/{name}-0001.raw.zst"),
        raw_size: 1 << 30,
        raw_sha256: "a".repeat(64),
        served_size: 200 << 20,
        served_sha256: "b".repeat(64),
        data_bytes: 600 << 20,
    }
}

async fn the_image_catalogue_refuses_duplicates_and_removal_while_used(db: TestDb) {
    let store = fleet(&db).await;
    let added = store.add_image(&new_image("debian-12"), "test").await.expect("add");
    assert_eq!((added.raw_size, added.source_format, added.last_used_at), (1 << 30, ImageFormat::Qcow2, None));
    let e = store.add_image(&new_image("debian-12"), "test").await.expect_err("taken");
    assert!(matches!(e, StoreError::ImageExists(ref n) if n == "debian-12"), "{e}");
    for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
        assert!(store.add_image(&new_image(bad), "test").await.is_err(), "{bad:?} refused");
    }
    assert_eq!(store.images().await.expect("list").len(), 1, "nothing of the refused adds");

    // A running reimage uses it: not removable; an unknown image cannot be used.
    let e = store
        .start_operation_using("reimage", &host("node-a"), "power_off", None, "{}", "test", Some("nope"))
        .await
        .expect_err("unknown image");
    assert!(matches!(e, StoreError::UnknownImage(_)), "{e}");
    let (op, started) = store
        .start_operation_using("reimage", &host("node-a"), "power_off", None, "{}", "test", Some("debian-12"))
        .await
        .expect("start");
    assert!(started);
    assert!(store.image("debian-12").await.expect("read").expect("there").last_used_at.is_some());
    let e = store.remove_image("debian-12", "test").await.expect_err("in use");
    assert!(e.to_string().contains(&format!("reimage of node-a ({})", op.id)), "{e}");
    assert!(store.image("debian-12").await.expect("read").is_some(), "still there");

    // Done: the host now runs it, which also keeps it.
    store.set_host_image(&host("node-a"), "debian-12").await.expect("host image");
    store
        .advance_operation(
            op.id,
            &nodekeeper_store::StepChange {
                from: "power_off".into(),
                to: "done".into(),
                status: nodekeeper_store::OperationStatus::Done,
                attempts: 0,
                deadline: None,
                last_error: None,
                data: None,
                event: "done".into(),
            },
            "test",
        )
        .await
        .expect("finish");
    let e = store.remove_image("debian-12", "test").await.expect_err("installed");
    assert!(e.to_string().contains("installed on node-a"), "{e}");
    store.set_host_image(&host("node-a"), "other").await.expect("host image");
    let removed = store.remove_image("debian-12", "test").await.expect("removable now");
    assert_eq!(removed.file, "catalogue/debian-12-0001.raw.zst");
    assert!(store.images().await.expect("list").is_empty());
    assert!(matches!(store.remove_image("debian-12", "test").await, Err(StoreError::UnknownImage(_))));
    let kinds: Vec<String> = store
        .events(&EventFilter::default())
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind.starts_with("image."))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["image.added", "image.removed"]);
}

/// `image remove` and a reimage starting with that image, side by side many times: either
/// the removal fails (the reimage holds the image) or the start fails (no such image), never
/// a running reimage of a removed image.
async fn an_image_removal_and_a_reimage_start_never_both_win(db: TestDb) {
    let store = fleet(&db).await;
    for round in 0..20 {
        let name = format!("img-{round}");
        store
            .add_image(&NewImage { file: format!("catalogue/{name}"), ..new_image(&name) }, "test")
            .await
            .expect("add");
        let barrier = Arc::new(Barrier::new(2));
        let (s1, b1, n1) = (store.clone(), barrier.clone(), name.clone());
        let remover = tokio::spawn(async move {
            b1.wait().await;
            s1.remove_image(&n1, "test").await
        });
        let (s2, b2, n2) = (store.clone(), barrier.clone(), name.clone());
        let starter = tokio::spawn(async move {
            b2.wait().await;
            s2.start_operation_using(
                &format!("reimage-{round}"),
                &host("node-b"),
                "power_off",
                None,
                "{}",
                "test",
                Some(&n2),
            )
            .await
        });
        let removed = remover.await.expect("join").is_ok();
        let started = starter.await.expect("join").is_ok();
        assert!(removed ^ started, "round {round}: removed {removed}, started {started}");
    }
}

async fn admin_tokens_are_unique_revocable_and_touched_once_a_minute(db: TestDb) {
    use nodekeeper_store::{Role, Timestamp};
    let store = db.store().await;
    let t = store.create_admin_token("alice@ops", Role::Operator, "aa", None, "cli:root").await.expect("ok");
    assert_eq!((t.role, t.revoked_at, t.last_used_at), (Role::Operator, None, None));
    // A name is taken for good, a digest is unique, a bad name is refused: nothing written.
    let again = store.create_admin_token("alice@ops", Role::Admin, "bb", None, "cli:root").await.expect_err("refused");
    assert!(matches!(again, StoreError::TokenExists(_)), "{again}");
    assert!(store.create_admin_token("bob", Role::Admin, "aa", None, "cli:root").await.is_err());
    assert!(matches!(store.create_admin_token("a b", Role::Admin, "cc", None, "x").await, Err(StoreError::Invalid(_))));
    assert_eq!(store.admin_tokens().await.expect("ok").len(), 1);
    let (read, digest) = store.admin_token("alice@ops").await.expect("ok").expect("ok");
    assert_eq!((read, digest.as_str()), (t.clone(), "aa"));
    assert!(store.admin_token("nobody").await.expect("ok").is_none());
    // Used: noted once; again within a minute: not written again.
    let now = Timestamp::now();
    store.touch_admin_token("alice@ops", now).await.expect("ok");
    store.touch_admin_token("alice@ops", Timestamp(now.0 + 30_000)).await.expect("ok");
    assert_eq!(store.admin_token("alice@ops").await.expect("ok").expect("ok").0.last_used_at, Some(now));
    store.touch_admin_token("alice@ops", Timestamp(now.0 + 61_000)).await.expect("ok");
    assert_eq!(
        store.admin_token("alice@ops").await.expect("ok").expect("ok").0.last_used_at,
        Some(Timestamp(now.0 + 61_000))
    );
    // Revoked once, with one event; revoking again changes nothing; unknown names are errors.
    let revoked = store.revoke_admin_token("alice@ops", "cli:root").await.expect("ok");
    assert!(revoked.revoked_at.is_some() && !revoked.usable_at(Timestamp::now()));
    let twice = store.revoke_admin_token("alice@ops", "cli:root").await.expect("ok");
    assert_eq!(twice.revoked_at, revoked.revoked_at);
    assert!(matches!(store.revoke_admin_token("nobody", "x").await, Err(StoreError::UnknownToken(_))));
    let kinds: Vec<String> =
        store.events(&EventFilter::default()).await.expect("ok").into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| k.starts_with("token.")).count(), 2, "{kinds:?}");
}

async fn operations_are_listed_newest_first_by_host_and_status(db: TestDb) {
    let store = fleet(&db).await;
    let (a, b) = (host("node-a"), host("node-b"));
    let (first, _) = store.start_operation("reimage", &a, "power_off", None, "{}", "test").await.expect("start");
    let (second, _) = store.start_operation("fence", &b, "confirm", None, "{}", "test").await.expect("start");
    let change = nodekeeper_store::StepChange {
        from: "power_off".into(),
        to: "power_off".into(),
        status: nodekeeper_store::OperationStatus::Failed,
        attempts: 1,
        deadline: None,
        last_error: Some("gave up".into()),
        data: None,
        event: "failed".into(),
    };
    store.advance_operation(first.id, &change, "test").await.expect("fail it").expect("moved");
    let ids = |ops: Vec<nodekeeper_store::Operation>| ops.into_iter().map(|o| o.id).collect::<Vec<_>>();
    assert_eq!(ids(store.operations(None, false, 10).await.expect("all")), [second.id, first.id]);
    assert_eq!(ids(store.operations(None, true, 10).await.expect("running")), [second.id]);
    assert_eq!(ids(store.operations(Some(&a), false, 10).await.expect("a")), [first.id]);
    assert!(store.operations(Some(&a), true, 10).await.expect("a running").is_empty());
    assert_eq!(store.operations(None, false, 1).await.expect("one").len(), 1);
}

async fn service_copies_move_by_compare_and_set_and_go_with_their_service(db: TestDb) {
    use nodekeeper_store::{CopyChange, Service};
    let store = fleet(&db).await;
    let svc = Service {
        name: "scheduler".into(),
        copies: 2,
        labels: vec!["control".into()],
        start: vec!["sh".into(), "-c".into(), "start".into()],
        stop: vec!["sh".into(), "-c".into(), "stop".into()],
        check: None,
        exclusive: true,
    };
    store.put_service(&svc, "test").await.expect("add");
    assert_eq!(store.services().await.expect("list"), std::slice::from_ref(&svc));
    // Bad definitions are refused, changing nothing.
    let empty = Service { start: vec![], ..svc.clone() };
    assert!(matches!(store.put_service(&empty, "test").await, Err(StoreError::Invalid(_))));
    let bad = Service { labels: vec!["no spaces".into()], ..svc.clone() };
    assert!(store.put_service(&bad, "test").await.is_err());
    assert_eq!(store.services().await.expect("list"), std::slice::from_ref(&svc));

    let place = |slot, h: &str| CopyChange::Place { service: "scheduler".into(), slot, host: host(h) };
    assert!(store.change_service_copy(&place(0, "node-a"), "controller").await.expect("place"));
    assert!(!store.change_service_copy(&place(0, "node-b"), "controller").await.expect("taken"), "a slot once");
    assert!(store.change_service_copy(&place(1, "node-b"), "controller").await.expect("place"));
    let mv = |generation| CopyChange::Move {
        service: "scheduler".into(),
        slot: 0,
        generation,
        from: host("node-a"),
        to: host("node-c"),
        why: "node-a is fenced".into(),
    };
    assert!(!store.change_service_copy(&mv(7), "controller").await.expect("stale"), "a stale generation loses");
    assert!(store.change_service_copy(&mv(1), "controller").await.expect("move"));
    assert!(!store.change_service_copy(&mv(1), "controller").await.expect("again"), "moved once");
    let copies = store.service_copies(Some("scheduler")).await.expect("copies");
    let at: Vec<(u32, String, u64)> = copies.iter().map(|c| (c.slot, c.host.to_string(), c.generation)).collect();
    assert_eq!(at, [(0, "node-c".to_owned(), 2), (1, "node-b".to_owned(), 1)]);
    assert_eq!(store.services_of(&host("node-c")).await.expect("of c").len(), 1);

    let labels = ["control".to_owned()].into_iter().collect();
    store.set_host_labels(&host("node-a"), &labels, "test").await.expect("labels");
    assert_eq!(store.host_labels().await.expect("labels").get(&host("node-a")), Some(&labels));
    assert!(store.set_host_labels(&host("nope"), &labels, "test").await.is_err());

    store.remove_service("scheduler", "test").await.expect("remove");
    assert!(store.service_copies(None).await.expect("copies").is_empty(), "its copies went with it");
    assert!(matches!(store.remove_service("scheduler", "test").await, Err(StoreError::UnknownService(_))));
}

async fn a_host_is_removed_only_out_of_service_and_owning_nothing(db: TestDb) {
    let store = fleet(&db).await;
    let (a, b) = (host("node-a"), host("node-b"));
    store.import_instances(&[new_instance("node-a", 0)], "test").await.expect("import");
    let id = store.instances(Some(&a)).await.expect("list")[0].uuid;
    // Kind changes: all or nothing, an unknown UUID refuses the batch.
    let changed = store.set_instance_kind(&[id], Some(false), Some(Storage::Local), "test").await.expect("kind");
    assert_eq!((changed[0].ha, changed[0].storage), (false, Storage::Local));
    let unknown = InstanceId::random();
    assert!(store.set_instance_kind(&[id, unknown], Some(true), None, "test").await.is_err());
    assert!(!store.instance(id).await.expect("read").expect("it").ha, "nothing changed");

    store.record_heartbeat(&b).await.expect("heartbeat");
    let in_service = store.remove_host(&b, "test").await.expect_err("active and heard");
    assert!(matches!(in_service, StoreError::HostInUse { .. }), "{in_service}");
    store.set_host_state(&b, HostState::Maintenance, "test", "planned").await.expect("maintenance");
    store.remove_host(&b, "test").await.expect("removed");
    assert!(store.host(&b).await.expect("read").is_none());
    // A host that owns an instance (a tombstone too) stays.
    store.delete_instances(&[id], "test").await.expect("tombstone");
    let owns = store.remove_host(&a, "test").await.expect_err("owns a tombstone");
    assert!(owns.to_string().contains("tombstones"), "{owns}");
    assert!(store.host(&a).await.expect("read").is_some());
    // Never heard from, owning nothing: removable as it is.
    store.remove_host(&host("node-c"), "test").await.expect("never heard");
    assert!(matches!(store.remove_host(&host("node-c"), "test").await, Err(StoreError::UnknownHost(_))));
}

async fn heartbeats_are_one_commit_and_revisions_move_with_what_a_guard_converges_on(db: TestDb) {
    use nodekeeper_store::{CopyChange, Service};
    let store = fleet(&db).await;
    let (a, b, c) = (host("node-a"), host("node-b"), host("node-c"));
    store.set_node_token(&a, &"a".repeat(64)).await.expect("token a");
    store.set_node_token(&b, &"b".repeat(64)).await.expect("token b");
    let rev = async |h: &HostName| store.host_revision(h).await.expect("revision").expect("known host");
    // One batch: a with its token, b with a wrong one, c without any, a host nobody added.
    let beats = [
        (a.clone(), "a".repeat(64)),
        (b.clone(), "a".repeat(64)),
        (c.clone(), String::new()),
        (host("node-z"), "a".repeat(64)),
    ];
    let (at, revisions) = store.record_heartbeats(&beats).await.expect("heartbeats");
    assert_eq!(revisions, vec![Some(rev(&a).await), None, None, None]);
    assert_eq!(store.require_host(&a).await.expect("a").last_heartbeat, Some(at));
    assert_eq!(store.require_host(&b).await.expect("b").last_heartbeat, None, "a wrong token records nothing");
    assert!(store.host_revision(&host("node-z")).await.expect("revision").is_none());

    // A heartbeat does not change the revision; what a guard converges on does.
    let (ra, rb, rc) = (rev(&a).await, rev(&b).await, rev(&c).await);
    store.record_heartbeats(&beats[..1]).await.expect("again");
    store.record_heartbeat(&a).await.expect("the single path");
    assert_eq!(rev(&a).await, ra);
    let batch: Vec<_> = (0..2).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let ids: Vec<_> = batch.iter().map(|i| i.uuid).collect();
    let ra2 = rev(&a).await;
    assert!(ra2 > ra, "an instance assigned to a");
    assert_eq!((rev(&b).await, rev(&c).await), (rb, rc), "nothing of b's or c's changed");
    // A move changes both the old owner's (it must remove) and the new owner's.
    store.set_host_state(&a, HostState::Fenced, "test", "fenced").await.expect("fence");
    let ra3 = rev(&a).await;
    assert!(ra3 > ra2, "the host's own state");
    store.evacuate(&ids[..1], &b, false, "test").await.expect("evacuate");
    assert!(rev(&a).await > ra3 && rev(&b).await > rb, "a move: both hosts");
    assert_eq!(rev(&c).await, rc);
    // Service copies, and their service's definition.
    let svc = Service {
        name: "scheduler".into(),
        copies: 1,
        labels: vec![],
        start: vec!["true".into()],
        stop: vec!["true".into()],
        check: None,
        exclusive: false,
    };
    store.put_service(&svc, "test").await.expect("add");
    assert_eq!(rev(&c).await, rc, "a service with no copy on c");
    let place = CopyChange::Place { service: "scheduler".into(), slot: 0, host: c.clone() };
    assert!(store.change_service_copy(&place, "controller").await.expect("place"));
    let rc2 = rev(&c).await;
    assert!(rc2 > rc, "a copy placed on c");
    store.put_service(&Service { check: Some(vec!["true".into()]), ..svc }, "test").await.expect("change");
    assert!(rev(&c).await > rc2, "the definition of a service c runs");
}

async fn a_live_migration_keeps_the_owner_until_it_is_finished_or_given_up(db: TestDb) {
    use nodekeeper_store::guard_api::Migration;
    let store = fleet(&db).await;
    let (a, b, c) = (host("node-a"), host("node-b"), host("node-c"));
    let batch: Vec<_> = (0..3).map(|n| new_instance("node-a", n)).collect();
    store.import_instances(&batch, "test").await.expect("import");
    let (x, y, held) = (batch[0].uuid, batch[1].uuid, batch[2].uuid);
    let rev = async |h: &HostName| store.host_revision(h).await.expect("revision").expect("known host");
    let to_b = Migration { from: a.clone(), to: b.clone(), uri: "qemu+tcp://10.0.0.2/system".into() };
    let (ra, rb, rc) = (rev(&a).await, rev(&b).await, rev(&c).await);
    store.start_migration(x, Generation::FIRST, &to_b, "controller", "drain").await.expect("start");
    assert!(rev(&a).await > ra && rev(&b).await > rb, "the owner must migrate it, the target expect it");
    assert_eq!(rev(&c).await, rc);
    // Refused: twice, at a stale generation, from a host that does not own it, a held one.
    let again = store.start_migration(x, Generation::FIRST, &to_b, "controller", "drain").await;
    assert!(matches!(again, Err(StoreError::Conflict { .. })), "{again:?}");
    let stale = store.start_migration(y, Generation(7), &to_b, "controller", "drain").await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    let from_c = Migration { from: c.clone(), ..to_b.clone() };
    assert!(store.start_migration(y, Generation::FIRST, &from_c, "controller", "drain").await.is_err());
    store.hold_instances(&a, &[held], true, "controller", "drain").await.expect("hold");
    assert!(store.start_migration(held, Generation::FIRST, &to_b, "controller", "drain").await.is_err());
    let to_self = Migration { to: a.clone(), ..to_b.clone() };
    assert!(matches!(
        store.start_migration(y, Generation::FIRST, &to_self, "c", "d").await,
        Err(StoreError::Invalid(_))
    ));

    // Both guards see it: the owner to migrate, the target to leave alone; ownership too.
    let on_a = store.assigned(&a).await.expect("a");
    assert_eq!(on_a.iter().find(|i| i.uuid == x).and_then(|i| i.migration.clone()), Some(to_b.clone()));
    let on_b = store.assigned(&b).await.expect("b");
    assert_eq!(on_b.iter().map(|i| (i.uuid, i.migration.clone())).collect::<Vec<_>>(), vec![(x, Some(to_b.clone()))]);
    let own = store.ownership(&[x]).await.expect("ownership");
    assert_eq!((own[0].owner.clone(), own[0].migrating_to.clone()), (a.clone(), Some(b.clone())));
    assert_eq!(store.migrations().await.expect("list").iter().map(|i| i.uuid).collect::<Vec<_>>(), vec![x]);
    // An operator's evacuation elsewhere is refused while it may run on its target.
    store.set_host_state(&a, HostState::Fenced, "test", "fenced").await.expect("fence");
    let elsewhere = store.evacuate(&[x], &c, false, "op").await;
    assert!(matches!(elsewhere, Err(StoreError::Item { .. })), "{elsewhere:?}");
    store.set_host_state(&a, HostState::Active, "test", "back").await.expect("back");

    // Finishing is a compare-and-set on the generation and the target.
    let wrong = store.finish_migration(x, Generation::FIRST, &c, "controller", "seen").await;
    assert!(matches!(wrong, Err(StoreError::Conflict { .. })), "{wrong:?}");
    let next = store.finish_migration(x, Generation::FIRST, &b, "controller", "seen").await.expect("finish");
    assert_eq!(next, Generation(2));
    let i = store.instance(x).await.expect("read").expect("x");
    assert_eq!(
        (i.owner, i.generation, i.migrating_to, i.migration_uri, i.migration_started_at),
        (b.clone(), Generation(2), None, None, None)
    );
    assert!(store.migrations().await.expect("list").is_empty());
    assert!(store.assigned(&a).await.expect("a").iter().all(|i| i.uuid != x));

    // Given up: the owner keeps it, nothing else changes; a second time changes nothing.
    store
        .start_migration(y, Generation::FIRST, &Migration { to: c.clone(), ..to_b.clone() }, "controller", "drain")
        .await
        .expect("start");
    assert!(!store.abandon_migration(y, &b, "controller", "not there").await.expect("other target"));
    assert!(store.abandon_migration(y, &c, "controller", "failed").await.expect("abandon"));
    assert!(!store.abandon_migration(y, &c, "controller", "failed").await.expect("twice"));
    let i = store.instance(y).await.expect("read").expect("y");
    assert_eq!((i.owner, i.generation, i.migrating_to), (a.clone(), Generation::FIRST, None));
    let kinds: Vec<String> = store
        .events(&nodekeeper_store::EventFilter { instance: Some(y), limit: Some(100), ..Default::default() })
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        kinds.contains(&"instance.migrating".to_owned()) && kinds.contains(&"instance.migration_abandoned".to_owned()),
        "{kinds:?}"
    );
    // A deleted instance migrates no more (its tombstone is judged on every host).
    store.start_migration(y, Generation::FIRST, &to_b, "controller", "drain").await.expect("start");
    store.delete_instances(&[y], "op").await.expect("delete");
    assert!(store.migrations().await.expect("list").is_empty());
    assert!(store.instance(y).await.expect("read").expect("y").migrating_to.is_none());
}
