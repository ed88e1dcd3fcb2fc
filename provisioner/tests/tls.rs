//! TLS for the APIs nodes use (issue "Safe under its own faults", should-fix): `tls init`
//! makes a CA and a server certificate; `serve` answers on its HTTPS listener with the same
//! routes; with `require`, node tokens and deploy tokens are refused over plain HTTP. A guard
//! trusts only the CA of its `ca_file`; the deploy agent trusts the CA only by the digest its
//! kernel command line carries, takes the image's digest over TLS and refuses bytes streamed
//! in clear that do not match it. Handshakes that never finish, and plain HTTP spoken to the
//! TLS port, stop nobody else.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, free_port, guard_binary, serve_config, wait_until, KillOnDrop, PROVISIONER};
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::NewHost;

fn nk(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(PROVISIONER).args(args).output().expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn nodes_use_the_api_over_tls_and_trust_only_the_provisioners_ca() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let name = |s: &str| s.parse().expect("name");
    let host = NewHost { name: name("node-a"), mac: None, ip: None, bmc_url: None, bmc_credentials: None };
    store.add_host(&host, "test").await.expect("host");
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let (port, tls_port) = (free_port(), free_port());
    let https = format!("https://127.0.0.1:{tls_port}");
    let (config, base) = serve_config(
        &d,
        "provisioner",
        db.url(),
        port,
        &format!(
            "[http.tls]\nlisten = \"127.0.0.1:{tls_port}\"\npublic_url = \"{https}\"\ncert = \"{d}/tls/server.pem\"\n\
             key = \"{d}/tls/server.key\"\nca = \"{d}/tls/ca.pem\"\nrequire = true\n[recovery]\nenabled = false\n"
        ),
    );
    let image: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(format!("{d}/images/node.img"), &image).expect("image");

    // serve without its certificate: a clear error that says how to make one.
    let (ok, _, err) = nk(&["serve", "--config", &config]);
    assert!(!ok && err.contains("tls init"), "{err}");

    let (ok, out, err) = nk(&["--json", "tls", "init", "--config", &config, "--name", "prov.example"]);
    assert!(ok, "{err}");
    let issued: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(issued["ca_created"], true);
    assert_eq!(issued["names"], serde_json::json!(["127.0.0.1", "prov.example"]));
    let pin = issued["ca_sha256"].as_str().expect("digest").to_owned();
    let ca = format!("{d}/tls/ca.pem");

    let log = std::fs::File::create(format!("{d}/serve.log")).expect("log");
    let _serve = KillOnDrop(
        Command::new(PROVISIONER)
            .args(["serve", "--config", &config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve"),
    );
    wait_until("serve answers over TLS", Duration::from_secs(30), async || {
        curl(&["--cacert", &ca, &format!("{https}/healthz")]).0 == 200
    })
    .await;

    // Only a client that trusts the CA gets in; the plain listener still serves boot files.
    let exit =
        Command::new("curl").args(["-s", "--max-time", "10", &format!("{https}/healthz")]).status().expect("curl");
    assert_eq!(exit.code(), Some(60), "no CA: curl cannot verify the certificate");
    let (code, pem) = curl(&[&format!("{base}/tls/ca.pem")]);
    assert_eq!(code, 200);
    assert_eq!(std::fs::read_to_string(&ca).expect("ca"), pem, "the CA nodes fetch is the one made");

    // Node tokens cross the network only over TLS.
    let (ok, token, err) = nk(&["--database-url", db.url(), "host", "token", "node-a"]);
    assert!(ok, "{err}");
    let token = token.trim().to_owned();
    let bearer = format!("Authorization: Bearer {token}");
    let (code, body) = curl(&["-X", "POST", "-H", &bearer, &format!("{base}/api/v1/hosts/node-a/guard/heartbeat")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(&https), "{body}");
    assert!(store.require_host(&name("node-a")).await.expect("host").last_heartbeat.is_none(), "nothing recorded");
    let (code, body) =
        curl(&["--cacert", &ca, "-X", "POST", "-H", &bearer, &format!("{https}/api/v1/hosts/node-a/guard/heartbeat")]);
    assert!((200..300).contains(&code), "{code} {body}");
    assert!(store.require_host(&name("node-a")).await.expect("host").last_heartbeat.is_some());
    let (code, body) = curl(&["-d", "{}", &format!("{base}/api/v1/hosts/node-a/deploy")]);
    assert_eq!(code, 403, "deploy reports too: {body}");

    // Clients that never finish a handshake, or speak plain HTTP to the TLS port, stop nobody.
    // From another address (one client's stalled handshakes are capped per address, so the
    // stalls must not come from the address the real request comes from).
    let stalled_from = |_| {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into()).expect("bind 127.0.0.2");
        sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], tls_port)).into()).expect("connect");
        std::net::TcpStream::from(sock)
    };
    let mut idle: Vec<std::net::TcpStream> = (0..200).map(stalled_from).collect();
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", tls_port)).expect("connect");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    plain.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plain HTTP is not answered on the TLS port");
    let started = Instant::now();
    let (code, _) = curl(&["--cacert", &ca, &format!("{https}/healthz")]);
    assert_eq!(code, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "answered beside 200 stalled handshakes");
    // Past the per-address cap, that address's next connection is closed at once, unanswered.
    let mut over = stalled_from(0);
    over.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut byte = [0u8; 1];
    let began = Instant::now();
    assert!(
        matches!(over.read(&mut byte), Ok(0) | Err(_)) && began.elapsed() < Duration::from_secs(4),
        "closed at once"
    );
    idle.clear();

    // The guard: through the API over TLS with the CA of its ca_file; with another CA it
    // cannot reach the provisioner (and says so in its report).
    let token_file = format!("{d}/node-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    std::fs::create_dir_all(format!("{d}/qemu")).expect("qemu");
    let guard_config = |ca_file: &str| {
        let path = format!("{d}/guard.toml");
        std::fs::write(
            &path,
            format!(
                "host = \"node-a\"\ndatabase_url = \"{https}\"\ntoken_file = \"{token_file}\"\nca_file = \"{ca_file}\"\n\
                 [libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
                 [boot]\nstate_dir = \"{d}/state\"\ndb_wait = \"2s\"\n"
            ),
        )
        .expect("guard config");
        path
    };
    let boot = |config: &str| -> serde_json::Value {
        let out = Command::new(guard_binary()).args(["boot", "--json", "--config", config]).output().expect("boot");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    assert_eq!(boot(&guard_config(&ca))["database"], "ok");
    let other = tempfile::tempdir().expect("other");
    let o = other.path().display().to_string();
    let (other_config, _) = serve_config(
        &o,
        "other",
        db.url(),
        free_port(),
        &format!(
            "[http.tls]\nlisten = \"127.0.0.1:1\"\npublic_url = \"https://127.0.0.1:1\"\ncert = \"{o}/s.pem\"\n\
             key = \"{o}/s.key\"\nca = \"{o}/ca.pem\"\n"
        ),
    );
    let (ok, _, err) = nk(&["tls", "init", "--config", &other_config]);
    assert!(ok, "{err}");
    assert_eq!(boot(&guard_config(&format!("{o}/ca.pem")))["database"], "unreachable", "another CA is not trusted");

    // The deploy agent: trusts the CA by its digest only, reports over TLS, takes the image's
    // digest over TLS and streams the bytes in clear.
    let cmdline = |pin: &str| {
        format!(
            "nk.server={https} nk.host=node-a nk.token=nope nk.image={base}/images/node.img nk.ca={pin} nk.disk={d}/disk"
        )
    };
    let mut wrong = nodekeeper_deploy::Params::from_cmdline(&cmdline(&"0".repeat(64))).expect("params");
    let e = tokio::task::spawn_blocking(move || wrong.trust()).await.expect("join").expect_err("wrong pin");
    assert!(e.to_string().contains("refusing"), "{e}");
    let mut p = nodekeeper_deploy::Params::from_cmdline(&cmdline(&pin)).expect("params");
    let p = tokio::task::spawn_blocking(move || {
        p.trust().expect("trust");
        p
    })
    .await
    .expect("join");
    let q = p.clone();
    let status = tokio::task::spawn_blocking(move || nodekeeper_deploy::report(&q, "booted", None, None))
        .await
        .expect("join")
        .expect("report over TLS");
    assert_eq!(status, 403, "heard over TLS (and refused: no reimage, no such token)");
    let q = p.clone();
    let (outcome, _) = tokio::task::spawn_blocking(move || nodekeeper_deploy::write_image(&q, |_, _| {}))
        .await
        .expect("join")
        .expect("write");
    assert!(matches!(outcome, nodekeeper_deploy::Outcome::Verified { bytes: 3_000_000, .. }), "{outcome:?}");

    // Someone else on the network serves other bytes under the image's name: the digest taken
    // over TLS does not match theirs, and nothing is written past the held-back head.
    let mitm = tempfile::tempdir().expect("mitm");
    let m = mitm.path().display().to_string();
    let mitm_port = free_port();
    let (mitm_config, mitm_base) = serve_config(&m, "mitm", db.url(), mitm_port, "[recovery]\nenabled = false\n");
    std::fs::write(format!("{m}/images/node.img"), vec![0x42u8; 3_000_000]).expect("evil image");
    let _mitm = KillOnDrop(
        Command::new(PROVISIONER)
            .args(["serve", "--config", &mitm_config])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    wait_until("the other server answers", Duration::from_secs(30), async || {
        curl(&[&format!("{mitm_base}/healthz")]).0 == 200
    })
    .await;
    let mut q = p.clone();
    q.image = format!("{mitm_base}/images/node.img");
    q.disk = format!("{d}/disk2");
    let e = tokio::task::spawn_blocking(move || nodekeeper_deploy::write_image(&q, |_, _| {}))
        .await
        .expect("join")
        .expect_err("the other bytes are refused");
    assert!(e.to_string().contains("refusing"), "{e}");
    let written = std::fs::read(format!("{d}/disk2")).unwrap_or_default();
    assert!(written.iter().all(|b| *b == 0), "nothing of theirs on the disk");
}
