//! The real thing: a QEMU guest (TCG, `-boot n`, virtio-net with Debian's iPXE ROM) boots
//! from the provisioner through DHCP → iPXE → HTTP script → kernel + initramfs, and the
//! initramfs prints a marker with the kernel arguments it got on the serial console. On UEFI
//! (OVMF), and on UEFI with Secure Boot enforcing (Microsoft's keys enrolled), where the host
//! gets Debian's signed chain instead: shim → GRUB over TFTP → its GRUB script → Debian's
//! signed kernel, and the initramfs reports the firmware's SecureBoot variable.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::Lab;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{BootMode, HostState, NewHost};

const BIN: &str = env!("CARGO_BIN_EXE_nodekeeper-provisioner");
const MAC: &str = "52:54:00:aa:00:01";
const MARKER: &str = "NODEKEEPER-PXE-MARKER";

fn kernel() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    kernels.sort();
    kernels.pop()
}

fn available() -> Option<PathBuf> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    let busybox_static = Command::new("sh")
        .args(["-c", "file -L \"$(command -v busybox)\" | grep -q 'statically linked'"])
        .status()
        .is_ok_and(|s| s.success());
    match (qemu, busybox_static, kernel()) {
        (true, true, Some(k)) => Some(k),
        _ => {
            assert!(
                std::env::var("NODEKEEPER_REQUIRE_QEMU").as_deref() != Ok("1"),
                "NODEKEEPER_REQUIRE_QEMU=1 but qemu-system-x86_64, a static busybox or /boot/vmlinuz-* is missing"
            );
            eprintln!("skipping: needs qemu-system-x86_64, busybox-static and a kernel in /boot");
            None
        }
    }
}

/// A newc initramfs: static busybox and an /init that prints the marker and powers off.
fn build_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let busybox =
        String::from_utf8(Command::new("sh").args(["-c", "command -v busybox"]).output().expect("which").stdout)
            .expect("utf-8");
    std::fs::copy(busybox.trim(), root.join("bin/busybox")).expect("copy busybox");
    std::fs::write(
        root.join("init"),
        format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mount -t proc proc /proc\n\
             /bin/busybox mount -t devtmpfs dev /dev\n\
             host=$(/bin/busybox sed -n 's/.*nk.host=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
             token=$(/bin/busybox sed -n 's/.*nk.token=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
             sb=$(/bin/busybox dmesg | /bin/busybox grep -o 'Secure boot [a-z]*' | /bin/busybox head -n1)\n\
             sb=${{sb#Secure boot }}\n\
             echo \"{MARKER} host=$host token_len=${{#token}} secureboot=${{sb:-none}}\" > /dev/ttyS0\n\
             /bin/busybox poweroff -f\n"
        ),
    )
    .expect("init");
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init && mknod -m 600 dev/console c 5 1 && find . | cpio -o -H newc --quiet | gzip -1 > {}",
            dir.join("initrd.img").display()
        ))
        .current_dir(&root)
        .status()
        .expect("cpio");
    assert!(ok.success(), "building the initramfs");
    dir.join("initrd.img")
}

#[tokio::test]
async fn a_qemu_guest_pxe_boots_through_dhcp_ipxe_and_http() {
    pxe_boot(Firmware::Bios).await;
}

/// The same on UEFI firmware (OVMF): the firmware's PXE asks with client architecture 7, gets
/// `ipxe.efi`, and iPXE boots the kernel through its EFI stub.
#[tokio::test]
async fn a_uefi_guest_pxe_boots_through_dhcp_ipxe_efi_and_http() {
    pxe_boot(Firmware::Uefi).await;
}

/// Secure Boot enforcing: OVMF with Microsoft's keys enrolled. The host's record says so, and
/// DHCP gives it `shimx64.efi`: shim (Microsoft-signed) loads GRUB (Debian-signed) over TFTP,
/// GRUB its script from the provisioner, and the signed kernel is checked by shim.
#[tokio::test]
async fn a_secure_boot_guest_pxe_boots_through_shim_and_grub() {
    pxe_boot(Firmware::UefiSecureBoot).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    Bios,
    Uefi,
    UefiSecureBoot,
}

/// OVMF's code and a fresh copy of its variables, as QEMU flash drives (with Secure Boot:
/// the SMM build, Microsoft's keys, and a q35 machine with SMM).
fn ovmf(dir: &Path, secure_boot: bool) -> Option<Vec<String>> {
    let (code, vars) = if secure_boot {
        (Path::new("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"), Path::new("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))
    } else {
        (Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"))
    };
    if !code.exists() || !vars.exists() {
        assert!(
            std::env::var("NODEKEEPER_REQUIRE_QEMU").as_deref() != Ok("1"),
            "NODEKEEPER_REQUIRE_QEMU=1 but OVMF is missing (apt-get install ovmf)"
        );
        eprintln!("skipping: no OVMF");
        return None;
    }
    let copy = dir.join("OVMF_VARS.fd");
    std::fs::copy(vars, &copy).expect("OVMF vars");
    let mut args: Vec<String> = Vec::new();
    if secure_boot {
        for a in ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"] {
            args.push(a.into());
        }
    }
    args.extend([
        "-drive".into(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", copy.display()),
    ]);
    Some(args)
}

async fn pxe_boot(firmware: Firmware) {
    if !common::netns_available() {
        return;
    }
    let Some(kernel) = available() else { return };
    let db = TestDb::sqlite();
    let store = db.store().await;
    let name = "node-a".parse().expect("name");
    store
        .add_host(
            &NewHost {
                name: "node-a".parse().expect("name"),
                mac: Some(MAC.parse().expect("mac")),
                ip: None,
                bmc_url: None,
                bmc_credentials: None,
            },
            "test",
        )
        .await
        .expect("host");
    if firmware == Firmware::UefiSecureBoot {
        store
            .change_boot_settings(
                &name,
                &nodekeeper_store::BootChange { boot_mode: Some(Some(BootMode::UefiSecureBoot)), ..Default::default() },
                "test",
            )
            .await
            .expect("mode");
    }
    store.set_host_state(&name, HostState::Reimaging, "test", "PXE test").await.expect("reimaging");
    // A reimage that has powered the host on: only then is the deploy handed out.
    let data = nodekeeper_provisioner::reimage::machine::ReimageData::first_boot("node.img");
    let data = serde_json::to_string(&data).expect("json");
    store.start_operation("reimage", &name, "agent_booted", None, &data, "test").await.expect("reimage");

    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    std::fs::create_dir_all(dir.path().join("images/deploy")).expect("images");
    std::fs::copy(&kernel, dir.path().join("images/deploy/vmlinuz")).expect("kernel");
    let initrd = build_initramfs(dir.path());
    std::fs::copy(&initrd, dir.path().join("images/deploy/initrd.img")).expect("initrd");
    std::fs::create_dir_all(dir.path().join("tftp")).expect("tftp");
    for f in ["undionly.kpxe", "ipxe.efi"] {
        let _ = std::fs::copy(Path::new("/usr/lib/ipxe").join(f), dir.path().join("tftp").join(f));
    }
    if firmware == Firmware::UefiSecureBoot {
        // Debian's signed shim, and its network GRUB as grubx64.efi (what shim loads).
        let efi = dir.path().join("efi");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(repo.join("images/efi/fetch.sh")).arg(&efi).output().expect("fetch.sh");
        assert!(out.status.success(), "images/efi/fetch.sh: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::copy(efi.join("shimx64.efi"), dir.path().join("tftp/shimx64.efi")).expect("shim");
        std::fs::copy(efi.join("grubnetx64.efi"), dir.path().join("tftp/grubx64.efi")).expect("grub");
    }
    let config = format!("{d}/provisioner.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{}\"\n[dhcp]\nmode = \"full\"\ninterface = \"br0\"\nserver_ip = \"10.20.0.1\"\nsubnet = \"10.20.0.0/24\"\nrange = [\"10.20.0.100\", \"10.20.0.199\"]\n[tftp]\nlisten = \"10.20.0.1:69\"\nroot = \"{d}/tftp\"\n[http]\nlisten = \"10.20.0.1:8080\"\npublic_url = \"http://10.20.0.1:8080\"\nimages_dir = \"{d}/images\"\ndeploy_kernel_args = \"console=ttyS0 quiet panic=-1\"\n",
            db.url()
        ),
    )
    .expect("config");

    let mut lab = Lab::new();
    let server = lab.server.clone();
    lab.spawn(&server, BIN, &["serve", "--config", &config]);
    let out = Command::new("ip").args(["-n", &server, "tuntap", "add", "tapq", "mode", "tap"]).output().expect("tap");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for args in
        [vec!["-n", &server, "link", "set", "tapq", "master", "br0"], vec!["-n", &server, "link", "set", "tapq", "up"]]
    {
        assert!(Command::new("ip").args(&args).status().expect("ip").success());
    }
    let serial = dir.path().join("serial.log");
    let firmware_args = match firmware {
        Firmware::Bios => Vec::new(),
        Firmware::Uefi | Firmware::UefiSecureBoot => match ovmf(dir.path(), firmware == Firmware::UefiSecureBoot) {
            Some(args) => args,
            None => return,
        },
    };
    let started = Instant::now();
    let mut args: Vec<String> = firmware_args;
    args.extend(common::QEMU_TCG.map(String::from));
    let base: &[&str] = &[
        "-boot",
        "n",
        "-netdev",
        "tap,id=n0,ifname=tapq,script=no,downscript=no",
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={MAC}"),
        "-serial",
        &format!("file:{}", serial.display()),
    ];
    args.extend(base.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu = Lab::run(&server, 170, "qemu-system-x86_64", &args);
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    let line = log.lines().find(|l| l.contains(MARKER));
    assert!(
        line.is_some(),
        "no marker after {:?} (qemu {:?}): serial log tail:\n{}\nqemu stderr: {}",
        started.elapsed(),
        qemu.status,
        log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&qemu.stderr)
    );
    let line = line.unwrap_or_default();
    assert!(line.contains("host=node-a"), "the kernel got the host's arguments: {line}");
    assert!(line.contains("token_len=64"), "and a 64-character one-time token: {line}");
    let secure_boot = match firmware {
        // The kernel's own word ("secureboot: Secure boot enabled"), on EFI only.
        Firmware::Bios => "secureboot=none",
        Firmware::Uefi => "secureboot=disabled",
        Firmware::UefiSecureBoot => "secureboot=enabled",
    };
    assert!(line.contains(secure_boot), "{firmware:?}: {line}");
    if firmware == Firmware::UefiSecureBoot {
        assert!(
            log.contains("Welcome to GRUB") || log.contains("nodekeeper: loading the deploy ramdisk"),
            "through GRUB"
        );
    }
    if firmware != Firmware::Bios {
        let leases = db.store().await.leases().await.expect("leases");
        assert!(leases.iter().any(|l| l.mac.to_string() == MAC), "the UEFI client took a lease: {leases:?}");
    }
    eprintln!("PXE boot ({firmware:?}) to marker under TCG: {:?}", started.elapsed());
}
