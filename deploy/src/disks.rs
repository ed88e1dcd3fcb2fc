//! Which disk to write: root-device hints as Ironic's, resolved by the agent from sysfs.
//!
//! Device names change between boots on real hardware (`sda` one day, `sdb` the next), and
//! an image written to the wrong drive destroys data. A host may carry a **hint**
//! (`host add --root-device`): `serial=`, `wwn=`, `by-path=`, `model=`, `name=` (all matched
//! case-insensitively, exactly) and `size>=` (bytes with a K/M/G/T suffix, or a bare number of
//! GiB as Ironic's `size`), comma-separated, all of which must hold. Exactly one disk must
//! match; none or several is an error that lists every disk seen, and nothing is written.
//! Without a hint: the smallest disk at least as large as the image that is not removable
//! (USB sticks, virtual media, CD-ROMs are never written).
//!
//! `by-path` is matched on the PCI address of the disk's controller (`pci-0000:00:1f.2`, the
//! start of udev's by-path name): the ramdisk has no udev. Two disks on one controller are
//! told apart by serial or WWN.

use std::io;
use std::path::Path;

/// A disk as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The kernel's name (`vda`, `sda`, `nvme0n1`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Removable media (USB, virtual media, CD-ROM).
    pub removable: bool,
    /// Model, as the device reports it (trimmed).
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// World wide name / identifier.
    pub wwn: String,
    /// `pci-DDDD:BB:DD.F` of its controller, when it is on PCI.
    pub by_path: String,
}

impl Disk {
    /// Its device node.
    pub fn dev(&self) -> String {
        format!("/dev/{}", self.name)
    }

    fn line(&self) -> String {
        let na = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
        format!(
            "{} ({} bytes, model {}, serial {}, wwn {}, {}{})",
            self.name,
            self.size,
            na(&self.model),
            na(&self.serial),
            na(&self.wwn),
            na(&self.by_path),
            if self.removable { ", removable" } else { "" }
        )
    }
}

/// A root-device hint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hint {
    /// `serial=`
    pub serial: Option<String>,
    /// `wwn=`
    pub wwn: Option<String>,
    /// `by-path=` (`pci-…`, or `/dev/disk/by-path/pci-…`)
    pub by_path: Option<String>,
    /// `model=`
    pub model: Option<String>,
    /// `name=` (`sda`, `/dev/sda`): only for hardware whose names are stable.
    pub name: Option<String>,
    /// `size>=`, in bytes.
    pub min_size: Option<u64>,
}

fn unescape(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or_else(|| format!("a % not followed by two hex digits in {v:?}"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape %{hex} in {v:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{v:?} is not UTF-8 once unescaped"))
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.:/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `100G`, `512M`, `2T`, `1073741824`… with binary units; a bare number is GiB (Ironic's `size`).
fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = digits.parse().map_err(|_| format!("size {v:?}: a number with an optional K, M, G or T"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "G" | "GB" | "GIB" => 30,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        other => return Err(format!("size {v:?}: unknown unit {other:?} (K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {v:?} is too large"))
}

impl Hint {
    /// Parses `serial=…,wwn=…,by-path=…,model=…,name=…,size>=…` (values may be
    /// percent-escaped; a value may not contain a comma unescaped).
    pub fn parse(text: &str) -> Result<Hint, String> {
        let mut h = Hint::default();
        let text = text.trim();
        if text.is_empty() {
            return Err("an empty root-device hint".into());
        }
        for part in text.split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("size>=") {
                h.min_size = Some(parse_size(&unescape(v)?)?);
                continue;
            }
            let (key, value) =
                part.split_once('=').ok_or_else(|| format!("{part:?}: expected KEY=VALUE or size>=SIZE"))?;
            let value = unescape(value.trim())?;
            if value.is_empty() {
                return Err(format!("{key}: an empty value"));
            }
            let slot = match key.trim() {
                "serial" => &mut h.serial,
                "wwn" => &mut h.wwn,
                "by-path" | "by_path" => &mut h.by_path,
                "model" => &mut h.model,
                "name" => &mut h.name,
                other => {
                    return Err(format!(
                        "unknown root-device hint {other:?} (serial, wwn, by-path, model, name, size>=)"
                    ))
                }
            };
            if slot.replace(value).is_some() {
                return Err(format!("{} given twice", key.trim()));
            }
        }
        Ok(h)
    }

    /// The hint as one word (for a kernel command line: no spaces, escaped).
    pub fn to_arg(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("serial", &self.serial),
            ("wwn", &self.wwn),
            ("by-path", &self.by_path),
            ("model", &self.model),
            ("name", &self.name),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", escape(v)));
            }
        }
        if let Some(n) = self.min_size {
            parts.push(format!("size>={n}B"));
        }
        parts.join(",")
    }

    /// Whether `d` satisfies every part of the hint.
    pub fn matches(&self, d: &Disk) -> bool {
        let same = |want: &Option<String>, have: &str| {
            want.as_ref().is_none_or(|w| !have.is_empty() && w.trim().eq_ignore_ascii_case(have.trim()))
        };
        let path_ok = self.by_path.as_ref().is_none_or(|p| {
            let p = p.trim().trim_start_matches("/dev/disk/by-path/");
            !d.by_path.is_empty() && p.to_ascii_lowercase().starts_with(&d.by_path.to_ascii_lowercase())
        });
        let name_ok = self.name.as_ref().is_none_or(|n| n.trim().trim_start_matches("/dev/") == d.name);
        same(&self.serial, &d.serial)
            && same(&self.wwn, &d.wwn)
            && same(&self.model, &d.model)
            && path_ok
            && name_ok
            && self.min_size.is_none_or(|m| d.size >= m)
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Every disk under `sys_block` (`/sys/block`): not loop, RAM, zram, floppy or optical
/// devices (`sr*`, which are removable anyway).
pub fn scan(sys_block: &Path) -> io::Result<Vec<Disk>> {
    let mut disks = Vec::new();
    for entry in std::fs::read_dir(sys_block)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "fd", "sr", "nbd"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dir = entry.path();
        let sectors: u64 = read(&dir.join("size")).parse().unwrap_or(0);
        let first =
            |files: &[&str]| files.iter().map(|f| read(&dir.join(f))).find(|v| !v.is_empty()).unwrap_or_default();
        let real = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        let pci = real
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .rfind(|c| is_pci_address(c))
            .map(|a| format!("pci-{a}"))
            .unwrap_or_default();
        disks.push(Disk {
            name,
            size: sectors.saturating_mul(512),
            removable: read(&dir.join("removable")) == "1",
            model: first(&["device/model"]),
            // NVMe and virtio name it in sysfs; SCSI, SAS and SATA (libata) disks in their
            // VPD page 0x80, as udev's scsi_id reads it.
            serial: Some(first(&["serial", "device/serial"]))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| vpd_serial(&dir.join("device/vpd_pg80"))),
            wwn: first(&["wwid", "device/wwid", "device/wwn"]),
            by_path: pci,
        });
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

/// The serial in a SCSI VPD page 0x80 (Unit Serial Number): a 4-byte header whose last byte
/// is the length, then the serial, space-padded. Empty when the page is absent or malformed.
fn vpd_serial(path: &Path) -> String {
    let Ok(page) = std::fs::read(path) else { return String::new() };
    if page.len() < 4 || page[1] != 0x80 {
        return String::new();
    }
    let end = (4 + usize::from(page[3])).min(page.len());
    String::from_utf8_lossy(&page[4..end]).trim_matches([' ', '\0']).to_owned()
}

/// `0000:00:1f.2`
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.chars().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The disk to write an image of `image_size` bytes to: the one the hint matches, or — no
/// hint — the smallest non-removable disk that holds the image. An error lists every disk.
pub fn choose(disks: &[Disk], hint: Option<&Hint>, image_size: u64) -> Result<Disk, String> {
    let seen = || {
        if disks.is_empty() {
            "no disks at all (is the storage driver in the ramdisk?)".to_owned()
        } else {
            format!("disks seen: {}", disks.iter().map(Disk::line).collect::<Vec<_>>().join("; "))
        }
    };
    let fits = |d: &&Disk| d.size >= image_size;
    if let Some(h) = hint {
        let matching: Vec<&Disk> = disks.iter().filter(|d| h.matches(d)).collect();
        return match matching.as_slice() {
            [one] if !fits(one) => Err(format!(
                "the root-device hint {} matches {}, which is smaller than the image ({image_size} bytes)",
                h.to_arg(),
                one.name
            )),
            [one] => Ok((*one).clone()),
            [] => Err(format!("no disk matches the root-device hint {}; {}", h.to_arg(), seen())),
            many => Err(format!(
                "{} disks match the root-device hint {} ({}): make it narrower; {}",
                many.len(),
                h.to_arg(),
                many.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
                seen()
            )),
        };
    }
    disks
        .iter()
        .filter(|d| !d.removable)
        .filter(fits)
        .min_by_key(|d| (d.size, d.name.clone()))
        .cloned()
        .ok_or_else(|| format!("no non-removable disk holds the image ({image_size} bytes); {}", seen()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gib: u64, serial: &str, model: &str, pci: &str, removable: bool) -> Disk {
        Disk {
            name: name.into(),
            size: gib << 30,
            removable,
            model: model.into(),
            serial: serial.into(),
            wwn: format!("eui.{serial}").to_lowercase(),
            by_path: if pci.is_empty() { String::new() } else { format!("pci-{pci}") },
        }
    }

    fn fleet() -> Vec<Disk> {
        vec![
            disk("nvme0n1", 256, "S4EWNX0N123", "Samsung SSD 980", "0000:01:00.0", false),
            disk("sda", 1024, "WD-WX11A", "WDC WD10EFRX", "0000:00:1f.2", false),
            disk("sdb", 1024, "WD-WX22B", "WDC WD10EFRX", "0000:00:1f.2", false),
            disk("sdc", 32, "USB123", "Flash Disk", "0000:00:14.0", true),
        ]
    }

    #[test]
    fn hints_parse_and_print_back() {
        let h = Hint::parse("serial=S4EWNX0N123, model=Samsung%20SSD%20980,size>=200G").expect("hint");
        assert_eq!(h.serial.as_deref(), Some("S4EWNX0N123"));
        assert_eq!(h.model.as_deref(), Some("Samsung SSD 980"));
        assert_eq!(h.min_size, Some(200 << 30));
        assert_eq!(Hint::parse(&h.to_arg()).expect("round trip"), h);
        assert!(!h.to_arg().contains(' '), "one word on a kernel command line");
        assert_eq!(Hint::parse("size>=100").expect("gib").min_size, Some(100 << 30), "a bare number is GiB");
        assert_eq!(Hint::parse("size>=512M").expect("mib").min_size, Some(512 << 20));
        for bad in ["", "serial", "colour=red", "serial=", "serial=a,serial=b", "size>=lots", "size>=1X", "model=%G0"] {
            assert!(Hint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exactly_one_disk_must_match_a_hint() {
        let disks = fleet();
        let pick = |h: &str| choose(&disks, Some(&Hint::parse(h).expect("hint")), 1 << 30).map(|d| d.name);
        assert_eq!(pick("serial=s4ewnx0n123").as_deref(), Ok("nvme0n1"), "case-insensitive");
        assert_eq!(pick("wwn=eui.wd-wx22b").as_deref(), Ok("sdb"));
        assert_eq!(pick("by-path=pci-0000:01:00.0-nvme-1").as_deref(), Ok("nvme0n1"));
        assert_eq!(pick("by-path=/dev/disk/by-path/pci-0000:01:00.0").as_deref(), Ok("nvme0n1"));
        assert_eq!(pick("model=WDC WD10EFRX,serial=WD-WX11A").as_deref(), Ok("sda"));
        assert_eq!(pick("name=/dev/sdb").as_deref(), Ok("sdb"));
        assert_eq!(pick("size>=500G,serial=WD-WX11A").as_deref(), Ok("sda"));
        let several = pick("model=WDC WD10EFRX").expect_err("two match");
        assert!(several.contains("2 disks match") && several.contains("sda, sdb"), "{several}");
        let none = pick("serial=NOPE").expect_err("none");
        assert!(
            none.contains("no disk matches") && none.contains("WD-WX22B") && none.contains("pci-0000:00:1f.2"),
            "{none}"
        );
        let small = choose(&disks, Some(&Hint::parse("serial=USB123").expect("hint")), 64 << 30).expect_err("small");
        assert!(small.contains("smaller than the image"), "{small}");
    }

    #[test]
    fn without_a_hint_the_smallest_fixed_disk_that_holds_the_image() {
        let disks = fleet();
        assert_eq!(choose(&disks, None, 1 << 30).expect("disk").name, "nvme0n1", "the USB stick is removable");
        assert_eq!(choose(&disks, None, 300 << 30).expect("disk").name, "sda", "ties by name");
        let e = choose(&disks, None, 2048 << 30).expect_err("too big");
        assert!(e.contains("no non-removable disk") && e.contains("nvme0n1"), "{e}");
        assert!(choose(&[], None, 1).expect_err("nothing").contains("storage driver"));
    }

    #[test]
    fn sysfs_is_read_as_the_kernel_lays_it_out() {
        let root = tempfile::tempdir().expect("dir");
        let devices = root.path().join("devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        std::fs::create_dir_all(&devices).expect("mkdir");
        std::fs::write(devices.join("size"), "6291456\n").expect("size");
        std::fs::write(devices.join("removable"), "0\n").expect("removable");
        std::fs::write(devices.join("serial"), "NK-DISK-A\n").expect("serial");
        let nvme = root.path().join("devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1");
        std::fs::create_dir_all(nvme.join("device")).expect("mkdir");
        std::fs::write(nvme.join("size"), "2097152\n").expect("size");
        std::fs::write(nvme.join("removable"), "0\n").expect("removable");
        std::fs::write(nvme.join("device/model"), "QEMU NVMe Ctrl  \n").expect("model");
        std::fs::write(nvme.join("device/serial"), "NVME-B  \n").expect("serial");
        std::fs::write(nvme.join("wwid"), "nvme.1b36-4e564d452d42\n").expect("wwid");
        // A SATA disk (libata): no serial file, the serial in its VPD page 0x80.
        let sata = root.path().join("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda");
        std::fs::create_dir_all(&sata).expect("mkdir");
        std::fs::write(sata.join("size"), "4194304\n").expect("size");
        std::fs::write(sata.join("removable"), "0\n").expect("removable");
        let device = root.path().join("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0");
        std::fs::write(device.join("vpd_pg80"), b"\x00\x80\x00\x14NK-SATA-2           ").expect("vpd");
        std::os::unix::fs::symlink(&device, sata.join("device")).expect("device link");
        let block = root.path().join("block");
        std::fs::create_dir_all(&block).expect("mkdir");
        std::os::unix::fs::symlink(&sata, block.join("sda")).expect("link");
        std::os::unix::fs::symlink(&devices, block.join("vda")).expect("link");
        std::os::unix::fs::symlink(&nvme, block.join("nvme0n1")).expect("link");
        std::fs::create_dir_all(block.join("loop0")).expect("loop");
        let disks = scan(&block).expect("scan");
        assert_eq!(disks.len(), 3, "{disks:?}");
        assert_eq!((disks[1].name.as_str(), disks[1].serial.as_str()), ("sda", "NK-SATA-2"));
        assert_eq!(disks[1].by_path, "pci-0000:00:1f.2");
        assert_eq!(vpd_serial(Path::new("/nonexistent")), "");
        assert_eq!(
            disks[0],
            Disk {
                name: "nvme0n1".into(),
                size: 1 << 30,
                removable: false,
                model: "QEMU NVMe Ctrl".into(),
                serial: "NVME-B".into(),
                wwn: "nvme.1b36-4e564d452d42".into(),
                by_path: "pci-0000:00:05.0".into(),
            }
        );
        assert_eq!((disks[2].name.as_str(), disks[2].size, disks[2].serial.as_str()), ("vda", 3 << 30, "NK-DISK-A"));
        assert_eq!(disks[2].by_path, "pci-0000:00:04.0");
    }
}
