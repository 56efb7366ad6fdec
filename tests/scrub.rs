//! Checksummed copies through a real mount: a clean volume scrubs clean (offline and
//! through the daemon); a byte flipped in the copy image under a frozen file makes the
//! copy-mount read of that track fail with EIO (other tracks still read), logs the file,
//! track and pair, and makes `pairfs scrub` exit 1 naming it, offline and online.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;

const TS: u64 = 64 * 1024;

fn scrub(target: &std::path::Path) -> (Option<i32>, String) {
    let out = pairfs(&["scrub", target.to_str().unwrap(), "--json"]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "scrub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), s)
}

fn mount_logged(v: &Vol, log: &std::path::Path) {
    let out = Command::new(BIN)
        .env("PAIRFS_LOG_FILE", log)
        .args([
            "mount",
            v.img.to_str().unwrap(),
            v.mnt.to_str().unwrap(),
            "--copy-mount",
            v.copy.to_str().unwrap(),
            "--daemon",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_flipped_copy_byte_is_eio_and_scrub_names_it() {
    let mut v = Vol::new("1G");
    v.mount();
    let d = v.path("d");
    std::fs::create_dir(&d).unwrap();
    let data = block(1, 0, (8 * TS) as usize);
    std::fs::write(v.path("d/f"), &data).unwrap();
    let out = pairfs(&["split", d.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Writes after the split: copy-on-write copies (with sums) of tracks 0..3.
    std::fs::OpenOptions::new()
        .write(true)
        .open(v.path("d/f"))
        .unwrap()
        .write_all_at(&vec![7u8; (3 * TS) as usize], 0)
        .unwrap();
    assert_eq!(std::fs::read(v.copy_path("d/f")).unwrap(), data);
    let (code, s) = scrub(&v.mnt);
    assert_eq!(code, Some(0), "{s}");
    let j: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(j["checked"], 8, "{s}");
    assert_eq!(j["unsummed"], 0, "{s}");
    v.umount();
    let (code, s) = scrub(&v.img);
    assert_eq!(code, Some(0), "offline: {s}");

    // The copy-image track under file track 5 of the frozen d/f.
    let meta = v.img.with_extension("img.meta");
    let m = pairfs::meta::Meta::open(&meta, true).unwrap();
    let pairs = m.load().unwrap().pairs;
    let f = pairs
        .iter()
        .flat_map(|p| p.frozen.iter())
        .find(|f| f.path.ends_with("f"))
        .expect("frozen d/f");
    let vt = f.extents.lookup(5).expect("track 5 mapped");
    let path = f.path.clone();
    drop(m);
    let copy_img = v.img.with_extension("img.copy");
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy_img)
        .unwrap();
    let at = vt * TS + 1234;
    let mut b = [0u8; 1];
    img.read_exact_at(&mut b, at).unwrap();
    img.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    img.sync_all().unwrap();

    let (code, s) = scrub(&v.img);
    assert_eq!(code, Some(1), "offline scrub must fail: {s}");
    let j: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(j["bad_total"], 1, "{s}");
    assert_eq!(j["bad"][0]["track"], vt, "{s}");
    assert_eq!(j["bad"][0]["file_track"], 5, "{s}");
    assert_eq!(j["bad"][0]["path"], path.as_str(), "{s}");
    // The text form names it too.
    let out = pairfs(&["scrub", v.img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("track={vt} file_track=5 path={path}")),
        "{text}"
    );

    let log = v.dir.path().join("daemon.log");
    mount_logged(&v, &log);
    let cf = std::fs::File::open(v.copy_path("d/f")).unwrap();
    let mut buf = vec![0u8; 4096];
    // Other tracks read fine; the damaged one is EIO, never wrong bytes.
    cf.read_exact_at(&mut buf, 4 * TS).unwrap();
    assert_eq!(buf[..], data[(4 * TS) as usize..(4 * TS) as usize + 4096]);
    let e = cf.read_exact_at(&mut buf, 5 * TS + 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let mut all = Vec::new();
    let e = std::fs::File::open(v.copy_path("d/f"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let (code, s) = scrub(&v.mnt);
    assert_eq!(code, Some(1), "online scrub must fail: {s}");
    let j: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(j["bad"][0]["track"], vt, "{s}");
    drop(cf);
    let st = state(&d);
    assert!(st.contains("sum_errors="), "{st}");
    v.umount();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "frozen file {path}: file track 5 (copy-image track {vt}) fails its checksum"
        )) && logged.contains("pair "),
        "{logged}"
    );

    // Repaired: clean again.
    img.write_all_at(&b, at).unwrap();
    let (code, s) = scrub(&v.img);
    assert_eq!(code, Some(0), "{s}");
}
