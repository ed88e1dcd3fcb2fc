//! The deploy ISO of one reimage, for Redfish virtual media (and UEFI HTTP boot by URI): the
//! deploy kernel and initrd, and a boot loader configuration whose kernel command line carries
//! this reimage's parameters and one-time token. Built per reimage, never shared: the token is
//! inside.
//!
//! Layout (ISO 9660 with Rock Ridge and Joliet, by `xorriso`, as Ironic builds its ISOs):
//! - `/nk/vmlinuz`, `/nk/initrd.img` — the deploy ramdisk;
//! - UEFI: an El Torito EFI image (`/boot/efiboot.img`, FAT) holding Debian's signed shim as
//!   `\EFI\BOOT\BOOTX64.EFI` and its signed CD GRUB (`gcdx64.efi`) as `grubx64.efi`; that GRUB
//!   finds the ISO by `/.disk/info` and reads `/boot/grub/grub.cfg` — so Secure Boot holds;
//! - BIOS: ISOLINUX (`/isolinux/isolinux.bin`, `ldlinux.c32`, `isolinux.cfg`).
//!
//! The loaders come from the loaders directory (the TFTP root): `shimx64.efi`, `grubcdx64.efi`,
//! `isolinux.bin`, `ldlinux.c32` (`scripts/install-tftp-root.sh` puts them there).

use std::path::{Path, PathBuf};
use std::process::Command;

use nodekeeper_store::BootMode;

/// Why an ISO could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// A file it needs is missing.
    #[error("the deploy ISO cannot be built: {0}")]
    Missing(String),
    /// A tool failed (the disk is full, the tool is not installed…): its own words.
    #[error("the deploy ISO cannot be built: {0}")]
    Tool(String),
}

/// What goes into one ISO.
#[derive(Debug, Clone)]
pub struct IsoSpec<'a> {
    /// The deploy kernel.
    pub kernel: &'a Path,
    /// The deploy initrd.
    pub initrd: &'a Path,
    /// The kernel command line, one argument per item (none may hold a space).
    pub args: &'a [String],
    /// The host's firmware, if known: its loader must be there. Unknown: both where present.
    pub boot_mode: Option<BootMode>,
    /// Names the volume and the boot menu (the host's name).
    pub label: &'a str,
}

/// The loaders the ISO needs, from `loaders` (the TFTP root).
struct Kit {
    uefi: Option<(PathBuf, PathBuf)>,
    bios: Option<(PathBuf, PathBuf)>,
}

impl Kit {
    fn find(loaders: &Path, mode: Option<BootMode>) -> Result<Kit, IsoError> {
        let pair = |a: &str, b: &str| {
            let (a, b) = (loaders.join(a), loaders.join(b));
            (a.is_file() && b.is_file()).then_some((a, b))
        };
        let kit = Kit { uefi: pair("shimx64.efi", "grubcdx64.efi"), bios: pair("isolinux.bin", "ldlinux.c32") };
        let at = loaders.display();
        match mode {
            Some(BootMode::Bios) if kit.bios.is_none() => {
                Err(IsoError::Missing(format!("no isolinux.bin and ldlinux.c32 in {at} (for a BIOS host)")))
            }
            Some(m) if m.is_uefi() && kit.uefi.is_none() => {
                Err(IsoError::Missing(format!("no shimx64.efi and grubcdx64.efi in {at} (for a UEFI host)")))
            }
            None if kit.uefi.is_none() && kit.bios.is_none() => Err(IsoError::Missing(format!(
                "no boot loader in {at} (shimx64.efi and grubcdx64.efi, or isolinux.bin and ldlinux.c32)"
            ))),
            Some(BootMode::Bios) => Ok(Kit { uefi: None, ..kit }),
            Some(_) => Ok(Kit { bios: None, ..kit }),
            None => Ok(kit),
        }
    }
}

use crate::http::ipxe::grub_word;

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), IsoError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        IsoError::Tool(format!(
            "{program}: {e}{}",
            if e.kind() == std::io::ErrorKind::NotFound { " (apt-get install xorriso mtools dosfstools)" } else { "" }
        ))
    })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let last: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = last[last.len().saturating_sub(3)..].join(" / ");
    Err(IsoError::Tool(format!("{program} failed ({}): {tail}", out.status)))
}

/// Builds the ISO at `out` (written beside it first, then renamed: a half-built ISO is never
/// served), from `spec` and the loaders in `loaders`. Returns its size. Blocking (run it on
/// the blocking pool). Nothing is left behind when it fails.
pub fn build(spec: &IsoSpec<'_>, loaders: &Path, out: &Path) -> Result<u64, IsoError> {
    if let Some(bad) = spec.args.iter().find(|a| a.is_empty() || a.chars().any(char::is_whitespace)) {
        return Err(IsoError::Tool(format!("kernel argument {bad:?} is empty or holds whitespace")));
    }
    for (what, file) in [("deploy kernel", spec.kernel), ("deploy initrd", spec.initrd)] {
        if !file.is_file() {
            return Err(IsoError::Missing(format!("no {what} at {}", file.display())));
        }
    }
    let kit = Kit::find(loaders, spec.boot_mode)?;
    let dir = out.parent().ok_or_else(|| IsoError::Tool(format!("{} has no directory", out.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| IsoError::Tool(format!("creating {}: {e}", dir.display())))?;
    let work = tempfile::Builder::new()
        .prefix(".iso-")
        .tempdir_in(dir)
        .map_err(|e| IsoError::Tool(format!("a work directory in {}: {e}", dir.display())))?;
    let w = work.path();
    let write = |rel: &str, text: &str| -> Result<PathBuf, IsoError> {
        let path = w.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| IsoError::Tool(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&path, text).map_err(|e| IsoError::Tool(format!("{}: {e}", path.display())))?;
        Ok(path)
    };
    let label: String = spec.label.chars().filter(char::is_ascii_alphanumeric).take(24).collect();
    let mut map: Vec<(PathBuf, String)> = vec![
        (spec.kernel.to_owned(), "/nk/vmlinuz".into()),
        (spec.initrd.to_owned(), "/nk/initrd.img".into()),
        (write(".disk/info", &format!("nodekeeper deploy ISO for {}\n", spec.label))?, "/.disk/info".into()),
    ];
    let mut boot: Vec<String> = Vec::new();
    if let Some((isolinux, ldlinux)) = &kit.bios {
        let cfg = format!(
            "default nk\nprompt 0\ntimeout 1\nlabel nk\n  kernel /nk/vmlinuz\n  append initrd=/nk/initrd.img {}\n",
            spec.args.join(" ")
        );
        map.push((write("isolinux.cfg", &cfg)?, "/isolinux/isolinux.cfg".into()));
        map.push((isolinux.clone(), "/isolinux/isolinux.bin".into()));
        map.push((ldlinux.clone(), "/isolinux/ldlinux.c32".into()));
        boot.extend(
            [
                "-b",
                "isolinux/isolinux.bin",
                "-c",
                "isolinux/boot.cat",
                "-no-emul-boot",
                "-boot-load-size",
                "4",
                "-boot-info-table",
            ]
            .map(str::to_owned),
        );
    }
    if let Some((shim, grub)) = &kit.uefi {
        let cfg = format!(
            "# nodekeeper: the deploy ramdisk for {label}\nset timeout=0\n\
             menuentry 'nodekeeper deploy' {{\n  linux /nk/vmlinuz {}\n  initrd /nk/initrd.img\n}}\n",
            spec.args.iter().map(|a| grub_word(a)).collect::<Vec<_>>().join(" "),
            label = spec.label
        );
        map.push((write("grub.cfg", &cfg)?, "/boot/grub/grub.cfg".into()));
        // The EFI system image El Torito points at: shim at the removable path, GRUB beside
        // it (shim loads grubx64.efi from its own directory).
        let img = w.join("efiboot.img");
        let size_kib = (std::fs::metadata(shim).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(grub).map(|m| m.len()).unwrap_or(0))
            / 1024
            + 512;
        let os = |s: &str| std::ffi::OsString::from(s);
        run("mkfs.vfat", &[os("-C").as_os_str(), img.as_os_str(), os(&size_kib.to_string()).as_os_str()])?;
        let image = os(&format!("{}", img.display()));
        run(
            "mmd",
            &[os("-i").as_os_str(), image.as_os_str(), os("::/EFI").as_os_str(), os("::/EFI/BOOT").as_os_str()],
        )?;
        for (from, to) in [(shim, "::/EFI/BOOT/BOOTX64.EFI"), (grub, "::/EFI/BOOT/grubx64.efi")] {
            run("mcopy", &[os("-i").as_os_str(), image.as_os_str(), from.as_os_str(), os(to).as_os_str()])?;
        }
        map.push((img, "/boot/efiboot.img".into()));
        if !boot.is_empty() {
            boot.push("-eltorito-alt-boot".into());
        }
        boot.extend(["-e", "boot/efiboot.img", "-no-emul-boot"].map(str::to_owned));
    }
    let partial = w.join("out.iso");
    let mut args: Vec<std::ffi::OsString> = ["-as", "mkisofs", "-quiet", "-R", "-J", "-V"].map(Into::into).to_vec();
    args.push(format!("NK_{label}").chars().take(32).collect::<String>().into());
    args.extend(boot.into_iter().map(Into::into));
    args.extend(["-o".into(), partial.clone().into_os_string(), "-graft-points".into()]);
    for (from, to) in &map {
        args.push(format!("{to}={}", from.display()).into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("xorriso", &refs)?;
    let len = std::fs::metadata(&partial).map_err(|e| IsoError::Tool(format!("{}: {e}", partial.display())))?.len();
    std::fs::rename(&partial, out).map_err(|e| IsoError::Tool(format!("{}: {e}", out.display())))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_loader_or_ramdisk_is_named_and_nothing_is_left() {
        let dir = tempfile::tempdir().expect("dir");
        let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
        std::fs::write(&kernel, b"k").expect("kernel");
        let args = vec!["nk.host=node-a".to_owned()];
        let out = dir.path().join("iso/node-a.iso");
        let spec =
            IsoSpec { kernel: &kernel, initrd: &initrd, args: &args, boot_mode: Some(BootMode::Uefi), label: "node-a" };
        let e = build(&spec, dir.path(), &out).expect_err("no initrd").to_string();
        assert!(e.contains("no deploy initrd"), "{e}");
        std::fs::write(&initrd, b"i").expect("initrd");
        let e = build(&spec, dir.path(), &out).expect_err("no loaders").to_string();
        assert!(e.contains("shimx64.efi and grubcdx64.efi"), "{e}");
        let bios = IsoSpec { boot_mode: Some(BootMode::Bios), ..spec.clone() };
        assert!(build(&bios, dir.path(), &out).expect_err("no isolinux").to_string().contains("isolinux.bin"));
        let spaced = vec!["nk.host=node a".to_owned()];
        let e = build(&IsoSpec { args: &spaced, ..spec }, dir.path(), &out).expect_err("space").to_string();
        assert!(e.contains("whitespace"), "{e}");
        assert!(!out.exists());
    }

    /// A real ISO from the real deploy ramdisk and Debian's loaders, read back by xorriso:
    /// both El Torito entries, the token on both command lines. Skipped where the parts are
    /// not built (`make test` builds them first).
    #[test]
    fn a_real_iso_boots_both_firmwares_and_carries_the_command_line() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let kernel = repo.join("images/deploy/out/vmlinuz");
        let initrd = repo.join("images/deploy/out/initrd.img");
        let efi = repo.join("images/node/out/efi");
        let have = |p: &Path| p.is_file();
        let parts =
            [kernel.clone(), initrd.clone(), efi.join("grubcdx64.efi"), "/usr/lib/ISOLINUX/isolinux.bin".into()];
        if !parts.iter().all(|p| have(p)) || Command::new("xorriso").arg("-version").output().is_err() {
            eprintln!("skipped: deploy ramdisk, loaders or xorriso missing");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let loaders = dir.path().join("loaders");
        std::fs::create_dir_all(&loaders).expect("mkdir");
        for (from, to) in [
            (efi.join("shimx64.efi"), "shimx64.efi"),
            (efi.join("grubcdx64.efi"), "grubcdx64.efi"),
            ("/usr/lib/ISOLINUX/isolinux.bin".into(), "isolinux.bin"),
            ("/usr/lib/syslinux/modules/bios/ldlinux.c32".into(), "ldlinux.c32"),
        ] {
            std::fs::copy(&from, loaders.join(to)).expect("copy loader");
        }
        let args: Vec<String> =
            ["nk.host=node-a", "nk.token=t0k3n", "nk.root_device=size>=1073741824B"].map(str::to_owned).to_vec();
        let out = dir.path().join("vmedia/node-a.iso");
        let spec = IsoSpec { kernel: &kernel, initrd: &initrd, args: &args, boot_mode: None, label: "node-a" };
        let len = build(&spec, &loaders, &out).expect("iso");
        let ramdisk = std::fs::metadata(&kernel).expect("k").len() + std::fs::metadata(&initrd).expect("i").len();
        assert!(len > ramdisk && len < ramdisk + (16 << 20), "{len} bytes for a {ramdisk}-byte ramdisk");
        let report = Command::new("xorriso")
            .args(["-indev", &out.display().to_string(), "-report_el_torito", "plain"])
            .output()
            .expect("xorriso");
        let report = String::from_utf8_lossy(&report.stdout).into_owned();
        assert!(report.contains("BIOS") && report.contains("UEFI"), "two boot entries: {report}");
        let extract = |inside: &str| -> String {
            let to = dir.path().join(inside.replace('/', "_"));
            let o = Command::new("xorriso")
                .args(["-osirrox", "on", "-indev", &out.display().to_string(), "-extract", inside])
                .arg(&to)
                .output()
                .expect("xorriso");
            assert!(o.status.success(), "{inside}: {}", String::from_utf8_lossy(&o.stderr));
            std::fs::read_to_string(&to).expect("extracted")
        };
        let grub = extract("/boot/grub/grub.cfg");
        assert!(
            grub.contains("linux /nk/vmlinuz 'nk.host=node-a' 'nk.token=t0k3n' 'nk.root_device=size>=1073741824B'\n"),
            "{grub}"
        );
        let isolinux = extract("/isolinux/isolinux.cfg");
        assert!(
            isolinux.contains(
                "append initrd=/nk/initrd.img nk.host=node-a nk.token=t0k3n nk.root_device=size>=1073741824B\n"
            ),
            "{isolinux}"
        );
        assert!(extract("/.disk/info").contains("node-a"));
        let left: Vec<_> =
            std::fs::read_dir(dir.path().join("vmedia")).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("node-a.iso")], "no work files left");
    }
}
