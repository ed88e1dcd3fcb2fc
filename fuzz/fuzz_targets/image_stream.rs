//! The agent's zero-aware sink and `image add`'s format checks, on anything: the bytes on the
//! "disk" after the sink are the image (beyond the held-back head), whatever pieces the image
//! came in and whatever the disk held before; every byte is written, zeroed or held back once.
//! A compressed stream of arbitrary bytes decodes or fails, never panics.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;
use nodekeeper_deploy::stream::Sink;
use nodekeeper_deploy::HEAD;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, spec)) = data.split_first() else { return };
    // The image: a byte with the top bit set is a run of (b & 0x7f) * 4 KiB zeros, any other
    // byte is itself, 513 times (so data blocks and zero runs both happen at any offset).
    let mut image = Vec::new();
    for &b in spec {
        if b & 0x80 != 0 {
            image.resize(image.len() + usize::from(b & 0x7f) * 4096, 0);
        } else {
            image.resize(image.len() + 513, b);
        }
        if image.len() > 8 << 20 {
            break;
        }
    }
    let _ = nodekeeper_provisioner::catalogue::detect(&image);
    let _ = nodekeeper_provisioner::catalogue::has_partition_table(&image);
    let mut disk = tempfile::tempfile().expect("tempfile");
    std::io::Write::write_all(&mut disk, &vec![0xa5u8; image.len() + 4096]).expect("old bytes");
    let mut sink = Sink::new(&disk);
    let step = usize::from(piece).max(1) * 997;
    for chunk in image.chunks(step) {
        sink.put(chunk).expect("put");
    }
    sink.flush().expect("flush");
    let head_len = HEAD.min(image.len());
    assert_eq!(sink.head, image[..head_len]);
    let w = sink.written;
    assert_eq!(w.raw, image.len() as u64);
    assert_eq!(w.raw, head_len as u64 + w.data + w.zeroed);
    let mut back = Vec::new();
    let mut f = &disk;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut back).expect("read back");
    assert_eq!(&back[head_len..image.len()], &image[head_len..], "the disk holds the image");
    assert!(back[image.len()..].iter().all(|&b| b == 0xa5), "nothing past the image");

    // The same bytes as a "compressed" stream: decoded or refused.
    if let Ok(mut dec) = zstd::stream::read::Decoder::new(spec) {
        let mut out = vec![0u8; 1 << 16];
        for _ in 0..64 {
            match dec.read(&mut out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
});
