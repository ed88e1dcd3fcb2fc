//! The reimage executor against a fake BMC (for failure injection) and a stub deploy agent
//! that talks to the real HTTP API with the token from the host's real iPXE script.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_provisioner::bmc::fake::Fake;
use nodekeeper_provisioner::bmc::{BmcError, Policy};
use nodekeeper_provisioner::http::{self, images::Images, HttpState};
use nodekeeper_provisioner::metrics::Metrics;
use nodekeeper_provisioner::reimage::executor::{self, BmcFactory};
use nodekeeper_provisioner::reimage::machine::{Deadlines, Limits};
use nodekeeper_provisioner::reimage::vmedia::{Addressing, Media};
use nodekeeper_provisioner::serve::config::HttpConfig;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{BootMode, HostName, HostState, NewHost, Operation, OperationStatus, Store};
use tokio_util::sync::CancellationToken;

struct Factory(Fake);

impl BmcFactory for Factory {
    type B = Fake;
    fn for_host(&self, _: &nodekeeper_store::Host) -> Result<Fake, BmcError> {
        Ok(self.0.clone())
    }
    fn policy(&self) -> Policy {
        Policy { confirm_within: Duration::from_millis(100), attempts: 1, poll: Duration::from_millis(10) }
    }
}

struct Rig {
    store: Store,
    fake: Fake,
    base: String,
    stop: CancellationToken,
    _db: TestDb,
    dir: tempfile::TempDir,
    media: Arc<Media>,
}

const MAC: &str = "52:54:00:00:00:0a";

fn name() -> HostName {
    "node-a".parse().expect("name")
}

async fn rig() -> Rig {
    rig_with(false).await
}

/// A rig whose provisioner has no DHCP (`dhcp_off`: UEFI HTTP boot goes by HttpBootUri).
async fn rig_with(dhcp_off: bool) -> Rig {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let h = NewHost {
        name: name(),
        mac: Some(MAC.parse().expect("mac")),
        ip: None,
        bmc_url: Some("redfish://fake".into()),
        bmc_credentials: None,
    };
    store.add_host(&h, "test").await.expect("host");
    let dir = tempfile::tempdir().expect("dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let config = HttpConfig {
        listen: listener.local_addr().expect("addr"),
        public_url: base.clone(),
        images_dir: dir.path().to_owned(),
        deploy_kernel: "deploy/vmlinuz".into(),
        deploy_initrd: "deploy/initrd.img".into(),
        deploy_kernel_args: String::new(),
        repair_public_key: None,
        max_event_streams: 4,
        tls: None,
        auth: Default::default(),
    };
    // Virtual media: ISOs under vmedia/, built from loaders/ (stand-ins: xorriso does not look
    // inside them) and the deploy ramdisk under deploy/ (stand-ins too).
    let loaders = dir.path().join("loaders");
    std::fs::create_dir_all(&loaders).expect("loaders");
    for f in ["shimx64.efi", "grubcdx64.efi", "isolinux.bin", "ldlinux.c32"] {
        std::fs::write(loaders.join(f), format!("stand-in {f}").repeat(100)).expect("loader");
    }
    std::fs::create_dir_all(dir.path().join("deploy")).expect("deploy");
    std::fs::write(dir.path().join("deploy/vmlinuz"), vec![0x4b; 300_000]).expect("kernel");
    std::fs::write(dir.path().join("deploy/initrd.img"), vec![0x49; 200_000]).expect("initrd");
    let config = Arc::new(config);
    let media = Arc::new(Media {
        dir: dir.path().join("vmedia"),
        loaders,
        http: config.clone(),
        tls: None,
        addressing: Addressing { prefix: 24, gateway: Some("10.20.0.1".parse().expect("ip")), dns: Vec::new() },
        dhcp_off,
    });
    let state = HttpState {
        store: store.clone(),
        config,
        metrics: Arc::new(Metrics::default()),
        health: Default::default(),
        guard_store: store.clone(),
        guard_writes: nodekeeper_provisioner::http::guard_writes::GuardWrites::start(
            store.clone(),
            std::time::Duration::from_secs(60),
        ),
        streams: Default::default(),
        tls: None,
        loaders: None,
        media: Some(media.clone()),
        bmc: Default::default(),
        images: Arc::new(Images::new(dir.path()).expect("images")),
    };
    let stop = CancellationToken::new();
    tokio::spawn(http::serve(listener, state, stop.clone()));
    Rig { store, fake: Fake::default(), base, stop, _db: db, dir, media }
}

impl Rig {
    fn executor(&self) -> CancellationToken {
        let stop = self.stop.child_token();
        tokio::spawn(executor::run_with_media(
            self.store.clone(),
            Arc::new(Factory(self.fake.clone())),
            self.media.clone(),
            format!("test-executor-{}", uuid::Uuid::new_v4()),
            Duration::from_millis(20),
            stop.clone(),
        ));
        stop
    }

    async fn wait(&self, id: i64, what: &str, ok: impl Fn(&Operation) -> bool) -> Operation {
        for _ in 0..500 {
            let op = self.store.operation(id).await.expect("read").expect("exists");
            if ok(&op) {
                return op;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let op = self.store.operation(id).await.expect("read");
        panic!("timed out waiting for {what}: {op:?}");
    }

    /// The host's iPXE script, fetched as iPXE would.
    fn script(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "30", &format!("{}/boot/{MAC}.ipxe", self.base)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The token, as the node gets it: from its iPXE script.
    fn token(&self) -> String {
        let script = self.script();
        script
            .split("nk.token=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no token in {script}"))
    }

    /// A stub deploy agent's report; returns the HTTP status.
    fn report(&self, token: &str, body: &str) -> u16 {
        self.report_as("node-a", token, body)
    }

    /// The same, for host `host`.
    fn report_as(&self, host: &str, token: &str, body: &str) -> u16 {
        let body = body.replace("TOKEN", token);
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
            ])
            .arg(format!("{}/api/v1/hosts/{host}/deploy", self.base))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).parse().expect("status")
    }
}

fn quick() -> Deadlines {
    Deadlines {
        bmc: Duration::from_secs(5),
        agent_boot: Duration::from_secs(20),
        image_write: Duration::from_secs(20),
        verify: Duration::from_secs(20),
        heartbeat: Duration::from_secs(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reimage_runs_to_done_through_the_agent_and_the_heartbeat() {
    let r = rig().await;
    r.fake.set(|s| s.on = true);
    // A UEFI host: both boot overrides go out in its mode.
    r.store
        .change_boot_settings(
            &name(),
            &nodekeeper_store::BootChange { boot_mode: Some(Some(BootMode::Uefi)), ..Default::default() },
            "test",
        )
        .await
        .expect("mode");
    let (op, started) = executor::request(&r.store, &name(), Some("node-v2.img"), quick(), Limits::default(), "test")
        .await
        .expect("request");
    assert!(started);
    let (again, started) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    assert!(!started && again.id == op.id, "a second request returns the running operation");
    assert_eq!(r.store.require_host(&name()).await.expect("host").state, HostState::Reimaging);

    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    assert!(r.fake.get(|s| s.pxe_once && s.on && s.power_ons == 1), "powered off, PXE once, powered on");
    assert_eq!(r.fake.get(|s| s.boot_mode), Some(BootMode::Uefi), "PXE once in UEFI mode");
    let token = r.token();
    assert_eq!(r.report("wrong", r#"{"token":"TOKEN","stage":"booted"}"#), 403);
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"written"}"#), 409, "not before booted");
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#), 200);
    r.wait(op.id, "image_written", |o| o.step == "image_written").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted","detail":"50%"}"#), 200, "progress");
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"written","detail":"2048 MiB in 31 s"}"#), 200);
    r.wait(op.id, "verified", |o| o.step == "verified").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"up"}"#), 409, "not before local_boot");
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"verified"}"#), 200);
    assert_eq!(
        r.report(&token, r#"{"token":"TOKEN","stage":"verified"}"#),
        200,
        "the token outlives verified: the node's first boot reports with it"
    );
    r.wait(op.id, "heartbeat", |o| o.step == "heartbeat").await;
    assert!(r.fake.get(|s| s.disk_boot && s.boot_mode == Some(BootMode::Uefi)), "the BMC boots the disk from now on");
    assert!(r.fake.get(|s| s.on && s.power_ons == 2), "and powered the host on into it");
    r.store.record_heartbeat(&name()).await.expect("heartbeat");
    let done = r.wait(op.id, "done", |o| o.status != OperationStatus::Running).await;
    assert_eq!((done.status, done.step.as_str()), (OperationStatus::Done, "done"));
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"up"}"#), 403, "the end of the reimage burns the token");
    let host = r.store.require_host(&name()).await.expect("host");
    assert_eq!((host.state, host.image.as_deref()), (HostState::Active, Some("node-v2.img")));
    let kinds: Vec<String> = r
        .store
        .events(&nodekeeper_store::EventFilter { host: Some(name()), limit: Some(100), ..Default::default() })
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for k in ["reimage.started", "reimage.step", "reimage.report", "reimage.done"] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_agent_gets_more_pxe_boots_then_the_reimage_fails() {
    let r = rig().await;
    let deadlines = Deadlines { agent_boot: Duration::from_millis(300), ..quick() };
    let (op, _) =
        executor::request(&r.store, &name(), None, deadlines, Limits { bmc_attempts: 3, pxe_boots: 2 }, "test")
            .await
            .expect("request");
    let _exec = r.executor();
    let failed = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.status, failed.step.as_str()), (OperationStatus::Failed, "agent_booted"));
    assert!(failed.last_error.as_deref().is_some_and(|e| e.contains("after 2 PXE boots")), "{failed:?}");
    assert_eq!(r.fake.get(|s| s.power_ons), 2, "two PXE boots");
    assert_eq!(r.store.require_host(&name()).await.expect("host").state, HostState::Maintenance);
}

/// `operation cancel` of a reimage waiting for its agent: it ends `failed` ("cancelled by …")
/// at that step, its host in maintenance, its deploy token burnt (the agent's report is
/// refused); a cancel of an ended operation is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_reimage_fails_where_it_was_and_burns_its_token() {
    let r = rig().await;
    let deadlines = Deadlines { agent_boot: Duration::from_secs(600), ..quick() };
    let (op, _) =
        executor::request(&r.store, &name(), None, deadlines, Limits { bmc_attempts: 3, pxe_boots: 2 }, "test")
            .await
            .expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let token = r.token();
    let ok = nodekeeper_provisioner::admin::operation_cancel(&r.store, "token:ops", op.id).await.expect("cancel");
    assert!(ok.json["cancel_requested"] == true, "{:?}", ok.json);
    let ended = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((ended.status, ended.step.as_str()), (OperationStatus::Failed, "agent_booted"), "{ended:?}");
    assert!(ended.last_error.as_deref().is_some_and(|e| e.contains("cancelled by token:ops")), "{ended:?}");
    assert_eq!(r.store.require_host(&name()).await.expect("host").state, HostState::Maintenance);
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#), 403, "the deploy token is burnt");
    let again = nodekeeper_provisioner::admin::operation_cancel(&r.store, "token:ops", op.id).await;
    assert!(again.is_err_and(|e| e.to_string().contains("failed already")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bmc_errors_are_retried_then_fail_the_step() {
    let r = rig().await;
    r.fake.set(|s| {
        s.on = true;
        s.fail_next = 2;
    });
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    exec.cancel();

    let r2 = rig().await;
    r2.fake.set(|s| {
        s.on = true;
        s.always_fail = true;
    });
    let (op, _) =
        executor::request(&r2.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r2.executor();
    let failed = r2.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.step.as_str(), failed.attempts), ("power_off", 2), "{failed:?}");
    assert!(failed.last_error.as_deref().is_some_and(|e| e.contains("after 3 attempts")), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_image_fails_at_verified_and_the_disk_is_not_made_bootable() {
    let r = rig().await;
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let token = r.token();
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#), 200);
    r.wait(op.id, "image_written", |o| o.step == "image_written").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"written"}"#), 200);
    r.wait(op.id, "verified", |o| o.step == "verified").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"verified","error":"sha256 mismatch"}"#), 200);
    let failed = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.status, failed.step.as_str()), (OperationStatus::Failed, "verified"));
    assert!(!r.fake.get(|s| s.disk_boot), "the disk is not marked bootable");
    assert_eq!(r.store.require_host(&name()).await.expect("host").state, HostState::Maintenance);
    // Bad reports are refused without changing anything.
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"flying"}"#), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_executor_resumes_where_the_database_says() {
    let r = rig().await;
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let first = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    first.cancel(); // the provisioner dies
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = r.token();
    assert_eq!(
        r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#),
        200,
        "the agent reports while no executor runs"
    );
    let _second = r.executor(); // a new provisioner
    r.wait(op.id, "image_written", |o| o.step == "image_written").await;
    assert_eq!(r.fake.get(|s| s.power_ons), 1, "resuming did not boot the host again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nobody_on_the_network_can_hijack_a_reimage() {
    let r = rig().await;
    r.fake.set(|s| s.on = true);
    // A slow BMC: the operation sits at power_off and pxe_next_boot for a while.
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    // Before the executor has powered the host on, the script hands out no token.
    let early = r.script();
    assert!(!early.contains("nk.token="), "no token before power_on: {early}");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    // The first fetch of this boot wins; a second one (an attacker, or a retry) gets none,
    // and the first token still works.
    let token = r.token();
    let second = r.script();
    assert!(!second.contains("nk.token=") && second.contains("exit 1"), "{second}");
    let refused = r
        .store
        .events(&nodekeeper_store::EventFilter { host: Some(name()), limit: Some(100), ..Default::default() })
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "reimage.token_refused")
        .count();
    assert_eq!(refused, 1, "the refusal is logged");
    // Reports out of order change nothing, and `up` cannot install a node token early.
    let node_token = "n0de-t0ken-0123456789abcdefghijklmnopqrstuv";
    let up = format!(r#"{{"token":"TOKEN","stage":"up","node_token":"{node_token}"}}"#);
    assert_eq!(r.report(&token, &up), 409);
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"verified"}"#), 409);
    let now = r.store.operation(op.id).await.expect("read").expect("exists");
    assert_eq!((now.step.as_str(), now.report.as_deref()), ("agent_booted", None), "nothing stored");
    let hash = nodekeeper_provisioner::http::guard_api::token_hash(node_token);
    assert_eq!(
        r.store.check_node_token(&name(), &hash).await.expect("lookup"),
        Some(false),
        "the early `up` installed no guard credential"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.store.operation(op.id).await.expect("read").expect("exists").step, "agent_booted", "still waits");
}

/// The deploy agent's own code (the `nodekeeper-deploy` binary is this plus reading
/// /proc/cmdline), writing to a file standing in for the disk.
async fn run_agent(r: &Rig, disk: &std::path::Path) -> bool {
    let cmdline = format!(
        "initrd=initrd.img nk.server={0} nk.host=node-a nk.token={1} nk.image={0}/images/node.img nk.disk={2} console=ttyS0",
        r.base,
        r.token(),
        disk.display()
    );
    let mut params = nodekeeper_deploy::Params::from_cmdline(&cmdline).expect("params");
    tokio::task::spawn_blocking(move || nodekeeper_deploy::deploy(&mut params, &mut |l| eprintln!("agent: {l}")))
        .await
        .expect("agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deploy_agent_writes_and_verifies_the_image() {
    let r = rig().await;
    let image: Vec<u8> = (0..8_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(r.dir.path().join("node.img"), &image).expect("image");
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let disk = r.dir.path().join("disk.img");
    assert!(run_agent(&r, &disk).await, "the agent verified the image");
    let written = std::fs::read(&disk).expect("disk");
    assert_eq!(&written[..image.len()], image.as_slice(), "the disk holds the image, byte for byte");
    // The config block, in the disk's last 4 KiB, past the image: what the node's first boot reads.
    let block = String::from_utf8_lossy(&written[written.len() - 4096..]).trim_end_matches('\0').to_owned();
    assert!(written.len() as u64 >= image.len() as u64 + 4096);
    assert!(block.starts_with("NODEKEEPER-CONFIG 1\nhost=node-a\n"), "{block:?}");
    let token = block.lines().find_map(|l| l.strip_prefix("token=")).expect("token in the block").to_owned();
    r.wait(op.id, "heartbeat", |o| o.step == "heartbeat").await;
    assert!(r.fake.get(|s| s.disk_boot));
    // A BIOS that still boots the network now gets the local disk, and no new token.
    let script = Command::new("curl").args(["-sf", &format!("{}/boot/{MAC}.ipxe", r.base)]).output().expect("curl");
    let script = String::from_utf8_lossy(&script.stdout);
    assert!(script.contains("sanboot") && !script.contains("nk.token"), "{script}");
    // The node's first boot reports up with the block's token: its first heartbeat. It
    // brings the node token its guard will use; a malformed one is refused, and nothing burns.
    let node_token = "n0de-t0ken_0123456789abcdef0123456789";
    let bad = r#"{"token":"TOKEN","stage":"up","node_token":"short"}"#;
    assert_eq!(r.report(&token, bad), 400);
    let bad = format!(r#"{{"token":"TOKEN","stage":"verified","node_token":"{node_token}"}}"#);
    assert_eq!(r.report(&token, &bad), 400, "a node token comes only with up");
    let check = r.store.check_node_token(&name(), &http::guard_api::token_hash(node_token)).await.expect("check");
    assert_eq!(check, Some(false));
    let up = format!(r#"{{"token":"TOKEN","stage":"up","detail":"first boot","node_token":"{node_token}"}}"#);
    assert_eq!(r.report(&token, &up), 200);
    let done = r.wait(op.id, "done", |o| o.status != OperationStatus::Running).await;
    assert_eq!(done.status, OperationStatus::Done);
    assert!(r.store.require_host(&name()).await.expect("host").last_heartbeat.is_some());
    let check = r.store.check_node_token(&name(), &http::guard_api::token_hash(node_token)).await.expect("check");
    assert_eq!(check, Some(true));
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"up"}"#), 403, "the token is burnt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_image_is_caught_by_the_agent_and_fails_at_verified() {
    let r = rig().await;
    let path = r.dir.path().join("node.img");
    std::fs::write(&path, vec![7u8; 3_000_000]).expect("image");
    // The provisioner digests the good image; then a byte rots on its disk, size and mtime
    // unchanged, so the ETag still names the good bytes.
    let out = Command::new("curl")
        .args(["-sfI", "--max-time", "30", &format!("{}/images/node.img", r.base)])
        .output()
        .expect("curl");
    assert!(out.status.success());
    let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[1_500_000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("rot");
    std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime)).expect("keep mtime");

    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    // The disk held a bootable system before; after a failed deploy it must not boot at all.
    let disk = r.dir.path().join("disk.img");
    let mut old = vec![0u8; 4 << 20];
    old[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&disk, &old).expect("old disk");
    assert!(!run_agent(&r, &disk).await, "the agent refuses the image");
    let after = std::fs::read(&disk).expect("disk");
    assert!(after[..nodekeeper_deploy::HEAD].iter().all(|b| *b == 0), "no boot sector, no partition table");
    assert!(after[nodekeeper_deploy::HEAD..3_000_000] == bytes[nodekeeper_deploy::HEAD..3_000_000]);
    let failed = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.status, failed.step.as_str()), (OperationStatus::Failed, "verified"));
    assert!(failed.last_error.as_deref().is_some_and(|e| e.contains("sha256 mismatch")), "{failed:?}");
    assert!(!r.fake.get(|s| s.disk_boot), "the disk is not marked bootable");
}

/// Whether QEMU is here (a panic under NODEKEEPER_REQUIRE_QEMU=1 when it is not); builds
/// the deploy ramdisk (cached) and returns its directory.
fn deploy_ramdisk() -> Option<std::path::PathBuf> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !qemu {
        assert!(
            std::env::var("NODEKEEPER_REQUIRE_QEMU").as_deref() != Ok("1"),
            "NODEKEEPER_REQUIRE_QEMU=1 but qemu-system-x86_64 is missing"
        );
        eprintln!("skipping: no qemu-system-x86_64");
        return None;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let build = Command::new(repo.join("images/deploy/build.sh")).output().expect("build the deploy ramdisk");
    assert!(build.status.success(), "images/deploy/build.sh: {}", String::from_utf8_lossy(&build.stderr));
    Some(repo.join("images/deploy/out"))
}

/// A disk of the test machine: its file, its serial, and the QEMU device (`virtio-blk-pci`,
/// `nvme`).
type TestDisk<'a> = (&'a std::path::Path, &'a str, &'a str);

/// The MAC of the test machine's NIC (and `nk.mac`, as the host's iPXE script gives it).
const TEST_MAC: &str = "52:54:00:12:34:56";

/// Boots the deploy ramdisk under QEMU (TCG) with the kernel arguments a host's iPXE script
/// carries, a `nic` (QEMU device) and `disks`; returns the serial console's text and how long
/// it ran.
async fn boot_ramdisk(
    r: &Rig,
    out: &std::path::Path,
    root_device: &str,
    nic: &str,
    disks: &[TestDisk<'_>],
) -> (String, std::time::Duration) {
    let port = r.base.rsplit(':').next().expect("port").to_owned();
    let server = format!("http://10.0.2.2:{port}");
    let append = format!(
        "console=ttyS0 panic=-1 quiet nk.server={server} nk.host=node-a nk.token={} nk.image={server}/images/node.img \
         nk.root_device={root_device} nk.mac={TEST_MAC}",
        r.token()
    );
    let serial = r.dir.path().join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let mut args: Vec<String> = common::QEMU_TCG.map(String::from).to_vec();
    args.extend(
        [
            "-kernel",
            &out.join("vmlinuz").display().to_string(),
            "-initrd",
            &out.join("initrd.img").display().to_string(),
            "-append",
            &append,
            "-netdev",
            "user,id=n0",
            "-device",
            &format!("{nic},netdev=n0,mac={TEST_MAC}"),
            "-serial",
            &format!("file:{}", serial.display()),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for (i, (path, serial_no, device)) in disks.iter().enumerate() {
        args.extend([
            "-drive".to_owned(),
            format!("file={},format=raw,if=none,id=d{i}", path.display()),
            "-device".to_owned(),
            format!("{device},drive=d{i},serial={serial_no}"),
        ]);
    }
    let started = std::time::Instant::now();
    let qemu = tokio::task::spawn_blocking(move || {
        Command::new("timeout").arg("300").arg("qemu-system-x86_64").args(&args).output().expect("qemu")
    })
    .await
    .expect("qemu task");
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(qemu.status.code().is_some(), "qemu: {:?}", qemu.status);
    (log, started.elapsed())
}

/// The deploy ramdisk itself under QEMU (TCG), on devices that are not virtio: an Intel e1000e
/// NIC and an NVMe disk beside a virtio one, each driver loaded by coldplug from its modalias,
/// the NIC found by its MAC, the NVMe disk by the host's root-device hint on its serial. The kernel arguments are the ones the
/// host's iPXE script carries (PXE is proven by pxe_qemu.rs); QEMU's user network reaches this
/// process at 10.0.2.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deploy_ramdisk_finds_its_nic_and_the_hinted_nvme_disk_under_qemu() {
    let Some(out) = deploy_ramdisk() else { return };
    let r = rig().await;
    let image: Vec<u8> = (0..16_000_000u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8).collect();
    std::fs::write(r.dir.path().join("node.img"), &image).expect("image");
    // Two disks: a small one first (what `vda` and "the smallest that fits" would pick) and
    // the target, told apart by the host's root-device hint on its serial.
    let other = r.dir.path().join("vda.raw");
    std::fs::File::create(&other).and_then(|f| f.set_len(32 << 20)).expect("disk");
    let disk = r.dir.path().join("vdb.raw");
    std::fs::File::create(&disk).and_then(|f| f.set_len(48 << 20)).expect("disk");
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let disks = [(other.as_path(), "NK-OTHER", "virtio-blk-pci"), (disk.as_path(), "NK-TARGET", "nvme")];
    let (log, took) = boot_ramdisk(&r, &out, "serial=NK-TARGET,size>=40M", "e1000e", &disks).await;
    assert!(log.contains("verified:"), "serial:\n{log}");
    // The executor takes it from there on its next tick: disk boot, then wait for the node.
    r.wait(op.id, "heartbeat", |o| o.step == "heartbeat").await;
    assert!(r.fake.get(|s| s.disk_boot));
    let written = std::fs::read(&disk).expect("disk");
    assert_eq!(&written[..image.len()], image.as_slice(), "the hinted disk holds the image, byte for byte");
    assert!(log.contains("target disk /dev/nvme0n1"), "the agent chose by the hint:\n{log}");
    assert!(
        log.contains(&format!("({TEST_MAC})")) && log.contains("e1000e") && log.contains("nvme"),
        "coldplug:\n{log}"
    );
    let untouched = std::fs::read(&other).expect("other disk");
    assert!(untouched.iter().all(|b| *b == 0), "the other disk was not touched");
    eprintln!(
        "deploy ramdisk under TCG: boot, DHCP, the disk chosen, 16 MB written and verified, power-off in {took:?}"
    );
}

/// A hint that matches no disk: the reimage fails at `agent_booted`, its error lists the disks
/// the agent saw (an NVMe and a SATA one here), and no disk is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hint_matching_no_disk_fails_the_reimage_and_writes_nothing() {
    let Some(out) = deploy_ramdisk() else { return };
    let r = rig().await;
    std::fs::write(r.dir.path().join("node.img"), vec![0x5a_u8; 4 << 20]).expect("image");
    let nvme = r.dir.path().join("nvme.raw");
    let sata = r.dir.path().join("sata.raw");
    for disk in [&nvme, &sata] {
        std::fs::File::create(disk).and_then(|f| f.set_len(32 << 20)).expect("disk");
    }
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let (log, _) = boot_ramdisk(
        &r,
        &out,
        "serial=NO-SUCH-DISK",
        "virtio-net-pci",
        &[(nvme.as_path(), "NK-NVME", "nvme"), (sata.as_path(), "NK-SATA", "ide-hd")],
    )
    .await;
    let failed = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.status, failed.step.as_str()), (OperationStatus::Failed, "agent_booted"), "{log}");
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("no disk matches") && error.contains("NK-NVME") && error.contains("NK-SATA"), "{error}");
    for disk in [&nvme, &sata] {
        assert!(std::fs::read(disk).expect("disk").iter().all(|b| *b == 0), "{} was written", disk.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_boot_path_picks_the_override_and_a_bmc_without_it_fails_before_power_off() {
    use nodekeeper_provisioner::bmc::BootTarget;
    use nodekeeper_store::{BootChange, BootPath};
    let r = rig().await;
    r.fake.set(|s| s.on = true);
    let http =
        BootChange { boot_mode: Some(Some(BootMode::Uefi)), boot_path: Some(BootPath::Http), ..Default::default() };
    r.store.change_boot_settings(&name(), &http, "test").await.expect("http");
    // A BMC without UefiHttp: the reimage fails at power_off, at once (no retries: the BMC
    // cannot do it), with the BMC's words, and the host was never powered off.
    r.fake.set(|s| s.lacks = vec![BootTarget::UefiHttp]);
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    assert_eq!((failed.step.as_str(), failed.attempts), ("power_off", 0), "{failed:?}");
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("boot target UefiHttp is not supported"), "{error}");
    assert!(r.fake.get(|s| s.on), "still running what it ran");
    assert_eq!(r.store.require_host(&name()).await.expect("host").state, HostState::Maintenance);

    // A BMC that has it: the one-time override is UefiHttp, and the script is the same.
    r.store.set_host_state(&name(), HostState::Active, "test", "back").await.expect("active");
    r.fake.set(|s| s.lacks.clear());
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    assert_eq!(r.fake.get(|s| (s.boot_target, s.boot_mode)), (Some(BootTarget::UefiHttp), Some(BootMode::Uefi)));
    assert!(r.script().contains("nk.token="), "the deploy script, as for PXE");
    let data: nodekeeper_provisioner::reimage::machine::ReimageData =
        serde_json::from_str(&r.store.operation(op.id).await.expect("op").expect("op").data).expect("data");
    assert_eq!(data.boot_path, BootPath::Http, "the reimage records its path");
    assert_eq!(r.fake.get(|s| s.boot_uri.clone()), None, "our DHCP gives the firmware its URL");

    // Secure Boot over UEFI HTTP boot goes by HttpBootUri to the deploy ISO (Debian's signed
    // network GRUB cannot bring its network up after an HTTP boot): a BMC without it fails.
    let r = rig().await;
    r.fake.set(|s| s.on = true);
    let sb = BootChange {
        boot_mode: Some(Some(BootMode::UefiSecureBoot)),
        boot_path: Some(BootPath::Http),
        ..Default::default()
    };
    r.store.change_boot_settings(&name(), &sb, "test").await.expect("sb");
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    assert_eq!(failed.step, "power_off");
    assert!(failed
        .last_error
        .unwrap_or_default()
        .contains("Secure Boot host boots over UEFI HTTP from its deploy ISO"));
    r.store.set_host_state(&name(), HostState::Active, "test", "back").await.expect("active");
    r.fake.set(|s| s.http_boot_uri = true);
    let (op, _) = executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let uri = r.fake.get(|s| s.boot_uri.clone()).expect("HttpBootUri");
    assert!(uri.contains(&format!("/vmedia/node-a-{}-1-", op.id)), "{uri}");
}

/// The HTTP status of a GET of `url` (curl), and the body saved to `to`.
fn fetch(url: &str, to: &std::path::Path) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-o"])
        .arg(to)
        .args(["-w", "%{http_code}", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).parse().expect("status")
}

/// `inside` of the ISO `iso`, read with xorriso.
fn from_iso(iso: &std::path::Path, inside: &str) -> String {
    let to = iso.with_extension("extracted");
    let _ = std::fs::remove_file(&to);
    let out = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", inside])
        .arg(&to)
        .output()
        .expect("xorriso");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&to).expect("extracted")
}

/// Redfish virtual media against the fake BMC, with the real HTTP server and real ISOs: one
/// ISO per boot carrying its token and the host's fixed address, served only while its
/// reimage runs, ejected at local_boot and at the end whatever the outcome (the sweeper
/// retries an eject the BMC refused); an ISO that cannot be built, or a BMC without virtual
/// media, fails the reimage before the host is powered off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn virtual_media_one_iso_per_boot_served_while_it_runs_and_always_ejected() {
    use nodekeeper_provisioner::bmc::BootTarget;
    use nodekeeper_store::{BootChange, BootPath};
    let r = rig().await;
    let other = NewHost {
        name: "node-b".parse().expect("name"),
        mac: Some("52:54:00:00:00:0b".parse().expect("mac")),
        ip: None,
        bmc_url: Some("redfish://fake".into()),
        bmc_credentials: None,
    };
    r.store.add_host(&other, "test").await.expect("node-b");
    r.store.execute_raw("UPDATE hosts SET ip = '10.20.0.42' WHERE name = 'node-a'").await.expect("fixed address");
    let vm = BootChange {
        boot_mode: Some(Some(BootMode::Uefi)),
        boot_path: Some(BootPath::VirtualMedia),
        ..Default::default()
    };
    r.store.change_boot_settings(&name(), &vm, "test").await.expect("virtual media");
    r.fake.set(|s| s.on = true);
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let url = r.fake.get(|s| s.media.clone()).expect("an ISO inserted");
    assert_eq!(r.fake.get(|s| (s.media_log.len(), s.boot_target)), (1, Some(BootTarget::Cd)), "inserted once, CD once");
    assert!(url.starts_with(&format!("{}/vmedia/node-a-{}-1-", r.base, op.id)), "{url}");
    let recorded = r.store.hosts_with_media().await.expect("media");
    assert_eq!(recorded, [(name(), url.clone())], "recorded before the BMC had it");
    // The BMC fetches it: the token and the fixed address are inside, nothing of it on disk
    // but the one ISO.
    let iso = r.dir.path().join("fetched.iso");
    assert_eq!(fetch(&url, &iso), 200);
    let grub = from_iso(&iso, "/boot/grub/grub.cfg");
    assert!(
        grub.contains("'nk.host=node-a'") && grub.contains("'nk.ip=10.20.0.42/24' 'nk.gateway=10.20.0.1'"),
        "{grub}"
    );
    let token = grub.split("'nk.token=").nth(1).and_then(|t| t.split('\'').next()).expect("token").to_owned();
    assert_eq!(std::fs::read_dir(r.dir.path().join("vmedia")).expect("dir").count(), 1);
    // Its token is refused for another host, and the iPXE script hands out no second one.
    assert_eq!(r.report_as("node-b", &token, r#"{"token":"TOKEN","stage":"booted"}"#), 403);
    assert!(!r.script().contains("nk.token="), "no second token for this boot over the network");
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#), 200);
    r.wait(op.id, "image_written", |o| o.step == "image_written").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"written"}"#), 200);
    r.wait(op.id, "verified", |o| o.step == "verified").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"verified"}"#), 200);
    r.wait(op.id, "heartbeat", |o| o.step == "heartbeat").await;
    assert_eq!(r.fake.get(|s| (s.media.clone(), s.disk_boot)), (None, true), "ejected at local_boot, then the disk");
    assert!(r.store.hosts_with_media().await.expect("media").is_empty());
    r.store.record_heartbeat(&name()).await.expect("heartbeat");
    r.wait(op.id, "done", |o| o.status == OperationStatus::Done).await;
    // Ended: the ISO is gone and refused, and so is its token.
    assert_eq!(fetch(&url, &iso), 404);
    assert_eq!(std::fs::read_dir(r.dir.path().join("vmedia")).expect("dir").count(), 0);
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"up"}"#), 403);

    // A failed reimage ejects too; a BMC that refuses the eject leaves it to the sweeper.
    r.fake.set(|s| s.eject_fails = true);
    let (op, _) = executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let url = r.fake.get(|s| s.media.clone()).expect("inserted");
    let token = {
        assert_eq!(fetch(&url, &iso), 200);
        let grub = from_iso(&iso, "/boot/grub/grub.cfg");
        grub.split("'nk.token=").nth(1).and_then(|t| t.split('\'').next()).expect("token").to_owned()
    };
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted","error":"no disk matches the hint"}"#), 200);
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    assert_eq!(failed.step, "agent_booted");
    assert_eq!(fetch(&url, &iso), 404, "refused once the reimage ended");
    assert_eq!(r.fake.get(|s| s.media.clone()), Some(url.clone()), "the BMC refused the eject");
    assert_eq!(r.store.hosts_with_media().await.expect("media"), [(name(), url)]);
    r.fake.set(|s| s.eject_fails = false);
    let factory = Factory(r.fake.clone());
    let swept = nodekeeper_provisioner::reimage::vmedia::sweep_once(&r.store, &factory, &r.media).await.expect("sweep");
    assert_eq!(swept, [name()]);
    assert!(r.fake.get(|s| s.media.is_none()) && r.store.hosts_with_media().await.expect("media").is_empty());

    // An ISO that cannot be built (a loader missing): failed at power_off, the host untouched.
    r.store.set_host_state(&name(), HostState::Active, "test", "back").await.expect("active");
    r.fake.set(|s| s.on = true);
    std::fs::remove_file(r.media.loaders.join("grubcdx64.efi")).expect("rm");
    let ons = r.fake.get(|s| s.power_ons);
    let (op, _) = executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    let error = failed.last_error.clone().unwrap_or_default();
    assert_eq!((failed.step.as_str(), failed.attempts), ("power_off", 0), "{failed:?}");
    assert!(error.contains("cannot be built") && error.contains("grubcdx64.efi"), "{error}");
    assert!(r.fake.get(|s| s.on && s.power_ons == ons), "never powered off");
    // A BMC without virtual media: the same, in the BMC's words.
    std::fs::write(r.media.loaders.join("grubcdx64.efi"), b"stand-in").expect("back");
    r.store.set_host_state(&name(), HostState::Active, "test", "back").await.expect("active");
    r.fake.set(|s| s.lacks = vec![BootTarget::Cd]);
    let (op, _) = executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    assert_eq!(failed.step, "power_off");
    assert!(failed.last_error.unwrap_or_default().contains("boot target Cd is not supported"));
    assert!(r.fake.get(|s| s.on), "never powered off");
}

/// UEFI HTTP boot where no DHCP of ours answers the firmware: the BMC gets this boot's ISO as
/// HttpBootUri (a BMC that takes none fails the reimage before power-off), and the ISO and
/// its token work as for virtual media, nothing inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uefi_http_boot_without_our_dhcp_goes_by_http_boot_uri() {
    use nodekeeper_provisioner::bmc::BootTarget;
    use nodekeeper_store::{BootChange, BootPath};
    let r = rig_with(true).await;
    let http =
        BootChange { boot_mode: Some(Some(BootMode::Uefi)), boot_path: Some(BootPath::Http), ..Default::default() };
    r.store.change_boot_settings(&name(), &http, "test").await.expect("http");
    r.fake.set(|s| s.on = true);
    let (op, _) =
        executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    let failed = r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    let error = failed.last_error.clone().unwrap_or_default();
    assert_eq!((failed.step.as_str(), failed.attempts), ("power_off", 0), "{failed:?}");
    assert!(error.contains("takes no HttpBootUri"), "{error}");
    assert!(r.fake.get(|s| s.on && s.power_ons == 0), "never powered off");

    r.store.set_host_state(&name(), HostState::Active, "test", "back").await.expect("active");
    r.fake.set(|s| s.http_boot_uri = true);
    let (op, _) = executor::request(&r.store, &name(), None, quick(), Limits::default(), "test").await.expect("again");
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let (target, uri, media) = r.fake.get(|s| (s.boot_target, s.boot_uri.clone(), s.media_log.len()));
    assert_eq!((target, media), (Some(BootTarget::UefiHttp), 0), "HTTP boot once, nothing inserted");
    let uri = uri.expect("an HttpBootUri");
    assert!(uri.starts_with(&format!("{}/vmedia/node-a-{}-1-", r.base, op.id)), "{uri}");
    let iso = r.dir.path().join("fetched.iso");
    assert_eq!(fetch(&uri, &iso), 200);
    let grub = from_iso(&iso, "/boot/grub/grub.cfg");
    let token = grub.split("'nk.token=").nth(1).and_then(|t| t.split('\'').next()).expect("token").to_owned();
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"booted"}"#), 200);
    // The failure is reported at the step that waits for it (a `booted` error raced the
    // executor's move to image_written and was refused now and then).
    r.wait(op.id, "image_written", |o| o.step == "image_written").await;
    assert_eq!(r.report(&token, r#"{"token":"TOKEN","stage":"written","error":"disk full"}"#), 200);
    r.wait(op.id, "failed", |o| o.status == OperationStatus::Failed).await;
    assert_eq!(fetch(&uri, &iso), 404, "refused once the reimage ended");
}

/// A raw disk image for the catalogue: an MBR boot signature, runs of random data, zeros.
fn catalogue_disk(len: usize) -> Vec<u8> {
    let mut img = vec![0u8; len];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for range in [0..446, 1 << 20..(1 << 20) + 700_000, len / 2..len / 2 + 300_000] {
        for b in &mut img[range] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    img[510] = 0x55;
    img[511] = 0xaa;
    img
}

/// A loop device over `len` bytes of random data (what a used disk holds), detached when
/// dropped; `None` without root (a panic where NODEKEEPER_REQUIRE_NETNS says root is here).
struct LoopDisk(String);

impl LoopDisk {
    fn new(dir: &std::path::Path, len: usize) -> Option<LoopDisk> {
        let backing = dir.join("used-disk");
        let mut noise = vec![0u8; len];
        let mut x: u64 = 7;
        for b in &mut noise {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            *b = (x >> 33) as u8;
        }
        std::fs::write(&backing, &noise).expect("backing file");
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output().ok()?;
        if !out.status.success() {
            assert!(std::env::var_os("NODEKEEPER_REQUIRE_NETNS").is_none(), "losetup: {out:?}");
            return None;
        }
        Some(LoopDisk(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_catalogue_image_is_deployed_compressed_and_the_device_reads_back_the_image() {
    use sha2::Digest;
    let r = rig().await;
    let raw = catalogue_disk(24 << 20);
    let raw_sha = format!("{:x}", sha2::Sha256::digest(&raw));
    let source = r.dir.path().join("upload.img");
    std::fs::write(&source, &raw).expect("raw");
    let qcow2 = r.dir.path().join("upload.qcow2");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&source)
        .arg(&qcow2)
        .status()
        .expect("qemu-img");
    assert!(conv.success());
    let image = nodekeeper_provisioner::catalogue::add(&r.store, r.dir.path(), "debian-12", &qcow2, 3, "test")
        .await
        .expect("image add");
    assert_eq!(image.raw_sha256, raw_sha);
    let Some(disk) = LoopDisk::new(r.dir.path(), 32 << 20) else {
        eprintln!("skipped: no loop device");
        return;
    };

    let (op, _) = executor::request(&r.store, &name(), Some("debian-12"), quick(), Limits::default(), "test")
        .await
        .expect("request");
    let e = r.store.remove_image("debian-12", "test").await.expect_err("in use");
    assert!(e.to_string().contains("running reimage of node-a"), "{e}");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    // The agent's command line is the script's, word for word (plus the disk).
    let script = r.script();
    let kernel = script.lines().find(|l| l.starts_with("kernel ")).unwrap_or_else(|| panic!("{script}"));
    assert!(kernel.contains(&format!(" nk.format=zstd nk.size={} ", raw.len())), "{kernel}");
    assert!(kernel.contains(&format!("/images/{} ", image.file)), "{kernel}");
    assert!(kernel.contains(&format!(" nk.sha256={} ", image.served_sha256)), "the catalogue's digest: {kernel}");
    let cmdline = format!("{} nk.disk={}", kernel.split_whitespace().skip(2).collect::<Vec<_>>().join(" "), disk.0);
    let mut params = nodekeeper_deploy::Params::from_cmdline(&cmdline).expect("params");
    let (ok, log) = tokio::task::spawn_blocking(move || {
        let mut log = Vec::new();
        let ok = nodekeeper_deploy::deploy(&mut params, &mut |l| log.push(l.to_owned()));
        (ok, log)
    })
    .await
    .expect("agent");
    assert!(ok, "{log:?}");
    let verified = log.iter().find(|l| l.starts_with("verified: ")).expect("verified line");
    assert!(verified.contains("MiB zeroed by the disk"), "{verified}");
    // The device, read back over the image's range: the image, though it held random bytes.
    let mut back = vec![0u8; raw.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&disk.0).expect("device"), &mut back).expect("read back");
    assert_eq!(format!("{:x}", sha2::Sha256::digest(&back)), raw_sha, "the device holds the image");
    r.wait(op.id, "heartbeat", |o| o.step == "heartbeat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotten_byte_in_a_catalogue_image_fails_at_verified() {
    let r = rig().await;
    let raw = catalogue_disk(8 << 20);
    let source = r.dir.path().join("upload.img");
    std::fs::write(&source, &raw).expect("raw");
    let image = nodekeeper_provisioner::catalogue::add(&r.store, r.dir.path(), "img", &source, 3, "test")
        .await
        .expect("image add");
    // A byte of the served file rots on the provisioner's disk, size and mtime unchanged: the
    // ETag recorded at `image add` still names the good bytes.
    let served = r.dir.path().join(&image.file);
    let mtime = std::fs::metadata(&served).and_then(|m| m.modified()).expect("mtime");
    let mut bytes = std::fs::read(&served).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&served, &bytes).expect("rot");
    std::fs::File::options().write(true).open(&served).and_then(|f| f.set_modified(mtime)).expect("mtime");

    let (op, _) =
        executor::request(&r.store, &name(), Some("img"), quick(), Limits::default(), "test").await.expect("request");
    let _exec = r.executor();
    r.wait(op.id, "agent_booted", |o| o.step == "agent_booted").await;
    let script = r.script();
    let kernel = script.lines().find(|l| l.starts_with("kernel ")).unwrap_or_else(|| panic!("{script}"));
    let disk = r.dir.path().join("disk.img");
    let mut old = vec![0u8; 12 << 20];
    old[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&disk, &old).expect("old disk");
    let cmdline =
        format!("{} nk.disk={}", kernel.split_whitespace().skip(2).collect::<Vec<_>>().join(" "), disk.display());
    let mut params = nodekeeper_deploy::Params::from_cmdline(&cmdline).expect("params");
    let ok =
        tokio::task::spawn_blocking(move || nodekeeper_deploy::deploy(&mut params, &mut |l| eprintln!("agent: {l}")))
            .await
            .expect("agent");
    assert!(!ok);
    let after = std::fs::read(&disk).expect("disk");
    assert!(after[..nodekeeper_deploy::HEAD].iter().all(|b| *b == 0), "the old boot sector is gone, none new");
    let failed = r.wait(op.id, "failed", |o| o.status != OperationStatus::Running).await;
    assert_eq!((failed.status, failed.step.as_str()), (OperationStatus::Failed, "verified"), "{failed:?}");
    let why = failed.last_error.unwrap_or_default();
    assert!(why.contains("does not decode") || why.contains("sha256 mismatch"), "{why}");
    // The reimage ended: the image can go.
    r.store.remove_image("img", "test").await.expect("removable after the reimage");
}
