//! Both machines on the one engine, crashed at every point and resumed (as steno's "fail at
//! every step" tests): the runner dies right after a step's effect (a BMC command, an
//! evacuation: nothing recorded yet), or right after the effects of its decision (the host's
//! state: the row not advanced yet). A fresh runner then steps the operation to its end. The
//! end must be the one of a run that never crashed: the same last step and status, the same
//! host state and image, every instance moved exactly once (generation 2, never 3).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{
    Generation, HostName, HostState, InstanceId, NewHost, NewInstance, Operation, OperationStatus, Storage, Store,
    StoreError,
};

use super::engine::{self, Decision, Machine};
use crate::bmc::fake::{Fake, Fakes};
use crate::recovery::controller::{Controller, RecoveryConfig};
use crate::recovery::fence::{AfterFence, FenceData};
use crate::reimage::executor::{self, Reimage};
use crate::reimage::machine::{AgentReport, AgentStage, Deadlines, Limits};

/// A machine that dies at its `at`-th fault point (counted across decide and effects),
/// right after the work of that point was done.
struct Crashing<'a, M> {
    inner: &'a M,
    at: usize,
    points: &'a AtomicUsize,
}

impl<M> Crashing<'_, M> {
    fn point(&self) -> Result<(), StoreError> {
        if self.points.fetch_add(1, Ordering::SeqCst) == self.at {
            return Err(StoreError::Invalid("the runner crashed here (test)".into()));
        }
        Ok(())
    }
}

impl<M: Machine> Machine for Crashing<'_, M> {
    type Step = M::Step;
    type Data = M::Data;
    const KIND: &'static str = M::KIND;
    const ACTOR: &'static str = M::ACTOR;

    async fn decide(
        &self,
        store: &Store,
        op: &Operation,
        step: M::Step,
        data: &mut M::Data,
    ) -> Result<Decision<M::Step>, StoreError> {
        let decision = self.inner.decide(store, op, step, data).await?;
        self.point()?;
        Ok(decision)
    }

    async fn effects(
        &self,
        store: &Store,
        op: &Operation,
        step: M::Step,
        data: &mut M::Data,
        decision: &Decision<M::Step>,
    ) -> Result<(), StoreError> {
        self.inner.effects(store, op, step, data, decision).await?;
        self.point()
    }

    fn retry_deadline(&self, data: &M::Data) -> Option<Duration> {
        self.inner.retry_deadline(data)
    }

    fn attempts_limit(&self, data: &M::Data) -> Option<u32> {
        self.inner.attempts_limit(data)
    }
}

fn n(s: &str) -> HostName {
    s.parse().expect("name")
}

/// What an operation's end looks like, to compare runs.
#[derive(Debug, PartialEq, Eq)]
struct End {
    status: OperationStatus,
    step: String,
    host: HostState,
    image: Option<String>,
    owners: Vec<(String, String, Generation)>,
    powered_on: bool,
}

async fn end(store: &Store, op: i64, host: &HostName, fake: &Fake) -> End {
    let op = store.operation(op).await.expect("op").expect("op");
    let h = store.require_host(host).await.expect("host");
    let mut owners: Vec<_> = store
        .instances(None)
        .await
        .expect("instances")
        .into_iter()
        .map(|i| (i.name, i.owner.to_string(), i.generation))
        .collect();
    owners.sort();
    End { status: op.status, step: op.step, host: h.state, image: h.image, owners, powered_on: fake.get(|s| s.on) }
}

/// Steps `op` with `m` until it ends or the machine fails (a crash); at most `limit` steps.
/// `world` plays the outside between steps (an agent's reports, a heartbeat).
async fn run<M: Machine>(
    m: &M,
    store: &Store,
    id: i64,
    limit: usize,
    world: &impl AsyncFn(&Store, &Operation),
) -> Result<(), StoreError> {
    for _ in 0..limit {
        let op = store.operation(id).await?.expect("op");
        if op.status != OperationStatus::Running {
            return Ok(());
        }
        world(store, &op).await;
        let op = store.operation(id).await?.expect("op");
        engine::step(m, store, op).await?;
    }
    panic!("operation {id} did not end within {limit} steps");
}

/// Runs a scenario once clean, then crashed at every fault point, and checks every crashed
/// run ends as the clean one did. Returns how many fault points there were.
async fn at_every_point<S, M, W>(setup: S, world: W) -> usize
where
    S: AsyncFn() -> (TestDb, Store, i64, HostName, Fake, M),
    M: Machine,
    W: AsyncFn(&Store, &Operation),
{
    let (_db, store, id, host, fake, m) = setup().await;
    let points = AtomicUsize::new(0);
    run(&Crashing { inner: &m, at: usize::MAX, points: &points }, &store, id, 100, &world).await.expect("clean run");
    let reference = end(&store, id, &host, &fake).await;
    let total = points.load(Ordering::SeqCst);
    assert!(total > 4, "the scenario has steps: {total}");
    eprintln!("{}: {total} fault points, each crashed and resumed", M::KIND);
    for at in 0..total {
        let (_db, store, id, host, fake, m) = setup().await;
        let points = AtomicUsize::new(0);
        let crashed = run(&Crashing { inner: &m, at, points: &points }, &store, id, 100, &world).await;
        assert!(crashed.is_err(), "fault point {at} of {total} was reached");
        // A new runner resumes from the database alone.
        run(&m, &store, id, 100, &world).await.expect("resumed run");
        assert_eq!(end(&store, id, &host, &fake).await, reference, "crashed at fault point {at} of {total}");
    }
    total
}

#[tokio::test]
async fn a_fence_crashed_at_every_point_resumes_to_the_same_end() {
    let setup = async || {
        let db = TestDb::sqlite();
        let store = db.store().await;
        for h in ["node-a", "node-b", "node-c"] {
            let host = NewHost { name: n(h), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
            store.add_host(&host, "test").await.expect("host");
            store.record_heartbeat(&n(h)).await.expect("heartbeat");
        }
        // Fixed UUIDs: placement orders by them, and every run must place alike.
        let items: Vec<NewInstance> = [
            ("web-1", true, "00000000-0000-4000-8000-000000000001"),
            ("db-1", true, "00000000-0000-4000-8000-000000000002"),
            ("batch-1", false, "00000000-0000-4000-8000-000000000003"),
        ]
        .into_iter()
        .map(|(name, ha, uuid)| NewInstance {
            uuid: uuid.parse::<InstanceId>().expect("uuid"),
            name: name.into(),
            owner: n("node-a"),
            ha,
            storage: Storage::Shared,
            generation: Generation(1),
            domain_xml: None,
        })
        .collect();
        store.import_instances(&items, "test").await.expect("import");
        store.set_host_state(&n("node-a"), HostState::Suspect, "test", "silent").await.expect("suspect");
        let fake = Fake::default();
        fake.set(|s| s.on = true);
        let fakes = Fakes::of([("node-a".to_owned(), fake.clone())]);
        let data = FenceData::new(AfterFence::PowerOn, 3);
        let json = serde_json::to_string(&data).expect("json");
        let (op, _) =
            store.start_operation("fence", &n("node-a"), "confirm", None, &json, "test").await.expect("fence");
        let config = RecoveryConfig { network_check_port: 0, ..RecoveryConfig::default() };
        let controller = Controller::new(store.clone(), Arc::new(fakes), config, "test".into());
        (db, store, op.id, n("node-a"), fake, controller)
    };
    // The controller as a machine: its fence, at the database's time.
    struct FenceOf(Controller<Fakes>);
    impl Machine for FenceOf {
        type Step = crate::recovery::fence::Step;
        type Data = FenceData;
        const KIND: &'static str = "fence";
        const ACTOR: &'static str = crate::recovery::controller::ACTOR;
        async fn decide(
            &self,
            store: &Store,
            op: &Operation,
            step: Self::Step,
            data: &mut FenceData,
        ) -> Result<Decision<Self::Step>, StoreError> {
            let now = store.now().await?;
            self.0.fence(now).decide(store, op, step, data).await
        }
        async fn effects(
            &self,
            store: &Store,
            op: &Operation,
            step: Self::Step,
            data: &mut FenceData,
            decision: &Decision<Self::Step>,
        ) -> Result<(), StoreError> {
            let now = store.now().await?;
            self.0.fence(now).effects(store, op, step, data, decision).await
        }
    }
    let setup = async || {
        let (db, store, id, host, fake, controller) = setup().await;
        (db, store, id, host, fake, FenceOf(controller))
    };
    let points = at_every_point(setup, async |_: &Store, _: &Operation| {}).await;
    assert!(points >= 8, "confirm, power_off, evacuate, restore: decide and effects each ({points})");
}

#[tokio::test]
async fn a_reimage_crashed_at_every_point_resumes_to_the_same_end() {
    let setup = async || {
        let db = TestDb::sqlite();
        let store = db.store().await;
        let host = NewHost {
            name: n("node-r"),
            mac: None,
            ip: None,
            bmc_url: Some("redfish://fake".into()),
            bmc_credentials: None,
        };
        store.add_host(&host, "test").await.expect("host");
        let fake = Fake::default();
        let fakes = Fakes::of([("node-r".to_owned(), fake.clone())]);
        let deadlines = Deadlines { bmc: Duration::from_secs(5), ..Deadlines::default() };
        let (op, _) =
            executor::request(&store, &n("node-r"), Some("node-v2.img"), deadlines, Limits::default(), "test")
                .await
                .expect("request");
        (db, store, op.id, n("node-r"), fake, Reimage { factory: Arc::new(fakes), media: None })
    };
    // The outside world: the agent reports the stage each waiting step waits for, and the
    // node heartbeats once it booted its disk.
    let world = async |store: &Store, op: &Operation| {
        let stage = match op.step.as_str() {
            "agent_booted" => AgentStage::Booted,
            "image_written" => AgentStage::Written,
            "verified" => AgentStage::Verified,
            "heartbeat" => {
                store.record_heartbeat(&op.target).await.expect("heartbeat");
                return;
            }
            _ => return,
        };
        let report = serde_json::to_string(&AgentReport { stage, error: None }).expect("json");
        store
            .report_operation(executor::KIND, &op.target, &op.step, &report, "agent reports", "agent")
            .await
            .expect("report");
    };
    let points = at_every_point(setup, world).await;
    assert!(points >= 16, "eight steps, decide and effects each ({points})");
}
