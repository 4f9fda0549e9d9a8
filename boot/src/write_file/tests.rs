use std::os::unix::fs::MetadataExt;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: Root,
    limits: Limits,
}

impl Fixture {
    fn offer(&self, req: &WriteFile) -> Result<Offer> {
        offer(&self.root, req, &self.limits)
    }

    /// A transfer of `data` to `path` begun from nothing, its first `upto` bytes sent.
    fn sent(&self, path: &str, data: &[u8], known: bool, upto: usize) -> (WriteFile, Receiver) {
        let req = request(path, data, known);
        let mut receiver = self.receiver(&req);
        send(&mut receiver, &data[..upto]);
        (req, receiver)
    }

    /// Asserts that `data` landed at `path` and nothing stays staged.
    fn assert_landed(&self, path: &str, data: &[u8]) {
        assert_eq!(self.read(path), data);
        assert!(staging_files(self).is_empty(), "{:?}", staging_files(self));
    }

    /// What landed at `path` under the root.
    fn read(&self, path: &str) -> Vec<u8> {
        fs::read(self.root.path().join(path)).expect("read")
    }

    /// A transfer of `req` begun from nothing.
    fn receiver(&self, req: &WriteFile) -> Receiver {
        begin(self.offer(req).expect("offer"), 0).expect("begin")
    }
}

fn fixture() -> Fixture {
    let (dir, root) = crate::fs::temp_root();
    let limits = Limits {
        max_file_bytes: 16 << 20,
        disk_reserve_bytes: 0,
        ..Limits::default()
    };
    Fixture {
        _dir: dir,
        root,
        limits,
    }
}

/// Deterministic, incompressible-looking content.
fn content(size: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

fn digest(bytes: &[u8]) -> Sha256 {
    digest::of_bytes(bytes)
}

fn request(path: &str, data: &[u8], known: bool) -> WriteFile {
    WriteFile {
        path: path.into(),
        mode: 0o640,
        size: data.len() as u64,
        sha256: known.then(|| digest(data)),
    }
}

fn send(receiver: &mut Receiver, bytes: &[u8]) {
    for chunk in bytes.chunks(7_000) {
        receiver.write(chunk).expect("write");
    }
}

/// A whole transfer from the offset the master would choose.
fn push(f: &Fixture, req: &WriteFile, data: &[u8]) -> Result<Written> {
    let offer = offer(&f.root, req, &f.limits)?;
    let offset = offer.have;
    assert_eq!(offer.have_sha256, digest(&data[..offset as usize]));
    let mut receiver = begin(offer, offset)?;
    send(&mut receiver, &data[offset as usize..]);
    receiver.commit(digest(data))
}

fn staging_files(f: &Fixture) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(f.root.state(State::Staging))
        .expect("list staging")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn full_transfer_lands_with_its_mode() {
    let f = fixture();
    let data = content(1 << 20);
    let req = request("archives/beat-0.1.0.tar.gz", &data, false);
    let written = push(&f, &req, &data).expect("push");
    assert_eq!(written.size, data.len() as u64);
    assert_eq!(written.received, data.len() as u64);
    assert_eq!(written.sha256, digest(&data));
    let dest = f.root.path().join("archives/beat-0.1.0.tar.gz");
    assert_eq!(fs::read(&dest).expect("read"), data);
    let mode = fs::metadata(&dest).expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert!(staging_files(&f).is_empty(), "{:?}", staging_files(&f));
}

#[test]
fn write_out_starts_every_step_from_where_the_transfer_began() {
    let f = fixture();
    let data = content(100_000);
    let req = request("stepped.bin", &data, true);
    let (_, cut) = f.sent("stepped.bin", &data, true, 30_000);
    drop(cut); // the connection is cut
    let offer = f.offer(&req).expect("offer");
    assert_eq!(offer.have, 30_000);
    let mut receiver = begin(offer, 30_000).expect("begin");
    receiver.writeback_step = 25_000;
    assert_eq!(
        receiver.written_back, 30_000,
        "nothing started before a byte arrives"
    );
    let mut marks = Vec::new();
    for chunk in data[30_000..].chunks(10_000) {
        receiver.write(chunk).expect("write");
        marks.push(receiver.written_back);
    }
    // Started each time 25,000 bytes had arrived since the last start, for all of
    // them; the last 10,000 are left to the commit's fsync.
    let expected = [30_000, 30_000, 60_000, 60_000, 60_000, 90_000, 90_000];
    assert_eq!(marks, expected);
    let written = receiver.commit(digest(&data)).expect("commit");
    assert_eq!(written.received, 70_000);
    f.assert_landed("stepped.bin", &data);
}

#[test]
fn empty_file_transfers() {
    let f = fixture();
    let req = request("empty", b"", true);
    let written = push(&f, &req, b"").expect("push");
    assert_eq!(written.received, 0);
    assert_eq!(f.read("empty"), b"");
}

#[test]
fn cut_transfer_resumes_where_it_stopped() {
    let f = fixture();
    let data = content(300_000);
    let half = 123_457usize;
    let req = request("archives/a.tar.gz", &data, true);
    let first = f.offer(&req).expect("offer");
    assert_eq!(first.have, 0);
    let mut receiver = begin(first, 0).expect("begin");
    send(&mut receiver, &data[..half]);
    drop(receiver); // the connection is cut

    assert!(!f.root.path().join("archives/a.tar.gz").exists());
    let second = f.offer(&req).expect("offer again");
    assert_eq!(second.have, half as u64);
    assert_eq!(second.have_sha256, digest(&data[..half]));
    let mut receiver = begin(second, half as u64).expect("resume");
    assert_eq!(receiver.remaining(), (data.len() - half) as u64);
    send(&mut receiver, &data[half..]);
    let written = receiver.commit(digest(&data)).expect("commit");
    assert_eq!(written.received, (data.len() - half) as u64);
    f.assert_landed("archives/a.tar.gz", &data);
}

#[test]
fn digest_keyed_resume_survives_a_new_destination() {
    let f = fixture();
    let data = content(50_000);
    let (_, receiver) = f.sent("one/a.bin", &data, true, 20_000);
    drop(receiver);
    let other = request("two/b.bin", &data, true);
    let written = push(&f, &other, &data).expect("push");
    assert_eq!(written.received, 30_000);
}

#[test]
fn unknown_digest_resumes_by_path_and_size() {
    let f = fixture();
    let data = content(200_000);
    let half = 70_001usize;
    let (req, receiver) = f.sent("data/file.bin", &data, false, half);
    drop(receiver);
    assert_eq!(staging_files(&f).len(), 1);
    assert!(staging_files(&f)[0].starts_with("path-"));

    // Another size is another staging key: nothing to resume.
    let shorter = request("data/file.bin", &data[..1000], false);
    assert_eq!(f.offer(&shorter).expect("offer").have, 0);

    let second = f.offer(&req).expect("offer again");
    assert_eq!(second.have, half as u64);
    // The master compares this with the digest of its own first `have` bytes.
    assert_eq!(second.have_sha256, digest(&data[..half]));
    let mut receiver = begin(second, half as u64).expect("resume");
    send(&mut receiver, &data[half..]);
    let written = receiver.commit(digest(&data)).expect("commit");
    assert_eq!(written.received, (data.len() - half) as u64);
    assert_eq!(f.read("data/file.bin"), data);
}

#[test]
fn offset_zero_discards_what_was_staged() {
    let f = fixture();
    let old = content(10_000);
    let mut new = old.clone();
    new[10] ^= 0xff; // the file changed between attempts
    let req_old = request("f.bin", &old, false);
    let mut receiver = f.receiver(&req_old);
    send(&mut receiver, &old[..5_000]);
    drop(receiver);

    let req = request("f.bin", &new, false);
    let again = f.offer(&req).expect("offer");
    assert_eq!(again.have, 5_000);
    assert_ne!(again.have_sha256, digest(&new[..5_000]));
    let mut receiver = begin(again, 0).expect("restart");
    send(&mut receiver, &new);
    let written = receiver.commit(digest(&new)).expect("commit");
    assert_eq!(written.received, new.len() as u64);
    assert_eq!(f.read("f.bin"), new);
}

#[test]
fn repeated_push_with_known_digest_sends_nothing() {
    let f = fixture();
    let data = content(64_000);
    let req = request("archives/x.tar.gz", &data, true);
    push(&f, &req, &data).expect("first push");
    let dest = f.root.path().join("archives/x.tar.gz");
    let inode = fs::metadata(&dest).expect("meta").ino();

    let again = WriteFile {
        mode: 0o600,
        ..req.clone()
    };
    let offer = f.offer(&again).expect("offer");
    assert_eq!(offer.have, data.len() as u64);
    assert_eq!(offer.have_sha256, digest(&data));
    let receiver = begin(offer, data.len() as u64).expect("begin");
    assert_eq!(receiver.remaining(), 0);
    let written = receiver.commit(digest(&data)).expect("commit");
    assert_eq!(written.received, 0);
    assert_eq!(written.size, data.len() as u64);
    let meta = fs::metadata(&dest).expect("meta");
    assert_eq!(meta.ino(), inode, "the file must not be rewritten");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "the new mode applies"
    );
    assert!(staging_files(&f).is_empty());
}

#[test]
fn wrong_digest_is_refused_and_discarded() {
    let f = fixture();
    let data = content(40_000);
    let req = request("bad.bin", &data, false);
    let mut receiver = f.receiver(&req);
    send(&mut receiver, &data);
    let wrong = digest(b"something else");
    let err = receiver.commit(wrong).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&wrong.to_hex()), "{text}");
    assert!(text.contains(&digest(&data).to_hex()), "{text}");
    assert!(text.contains("bad.bin"), "{text}");
    assert!(!f.root.path().join("bad.bin").exists());
    assert!(staging_files(&f).is_empty(), "the part must be removed");
    // A retry starts clean.
    assert_eq!(f.offer(&req).expect("offer").have, 0);
}

#[test]
fn content_other_than_announced_is_refused() {
    let f = fixture();
    let data = content(1_000);
    let req = WriteFile {
        sha256: Some(digest(b"announced")),
        ..request("x.bin", &data, false)
    };
    let mut receiver = f.receiver(&req);
    send(&mut receiver, &data);
    let err = receiver.commit(digest(&data)).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&digest(b"announced").to_hex()),
        "{err}"
    );
    assert!(!f.root.path().join("x.bin").exists());
    assert!(staging_files(&f).is_empty());
}

#[test]
fn short_or_long_transfers_are_refused() {
    let f = fixture();
    let data = content(1_000);
    let (req, mut receiver) = f.sent("short.bin", &data, false, 600);
    let err = receiver.write(&content(401)).unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err}");
    let err = receiver.commit(digest(&data)).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("expected 1000 bytes, received 600"),
        "{err}"
    );
    assert!(!f.root.path().join("short.bin").exists());
    // What arrived is kept for a resume.
    assert_eq!(f.offer(&req).expect("offer").have, 600);
}

#[test]
fn offset_beyond_what_is_held_is_refused() {
    let (_f, _, _, offer) = offered("o.bin", false);
    let err = begin(offer, 1).unwrap_err();
    assert!(matches!(err, Error::BadRequest(_)), "{err}");
    assert!(err.to_string().contains("offset 1"), "{err}");
}

#[test]
fn too_large_is_refused() {
    let f = fixture();
    let req = WriteFile {
        path: "big.bin".into(),
        mode: 0o644,
        size: f.limits.max_file_bytes + 1,
        sha256: None,
    };
    let err = f.offer(&req).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("big.bin"), "{err}");
}

#[test]
fn no_space_is_refused() {
    let mut f = fixture();
    f.limits.disk_reserve_bytes = u64::MAX;
    let err = f.offer(&request("x.bin", b"abc", false)).unwrap_err();
    assert!(matches!(err, Error::NoSpace { .. }), "{err}");
}

#[test]
fn special_modes_are_refused() {
    let f = fixture();
    for mode in [0o4755, 0o2755, 0o1777, 0o100644] {
        let req = WriteFile {
            mode,
            ..request("bin/tool", b"#!/bin/sh\n", false)
        };
        let err = f.offer(&req).unwrap_err();
        assert!(matches!(err, Error::BadRequest(_)), "{mode:o}: {err}");
        assert!(err.to_string().contains(&format!("{mode:#o}")), "{err}");
    }
}

#[test]
fn bad_paths_are_refused() {
    let f = fixture();
    for path in [
        ".erel/staging/x.part",
        ".erel/releases/beat.json",
        "../x",
        "/etc/x",
    ] {
        let err = f.offer(&request(path, b"x", false)).unwrap_err();
        assert!(matches!(err, Error::InvalidPath { .. }), "{path}: {err}");
    }
}

#[test]
fn symlinked_parent_is_refused() {
    let f = fixture();
    let outside = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(outside.path(), f.root.path().join("link")).expect("symlink");
    let err = f.offer(&request("link/file", b"x", false)).unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    assert!(fs::read_dir(outside.path()).expect("list").next().is_none());
}

#[test]
fn symlink_planted_during_the_transfer_is_refused() {
    let f = fixture();
    let outside = tempfile::tempdir().expect("tempdir");
    let data = content(100);
    let req = request("later/deeper/file", &data, false);
    let mut receiver = f.receiver(&req);
    send(&mut receiver, &data);
    std::os::unix::fs::symlink(outside.path(), f.root.path().join("later")).expect("symlink");
    let err = receiver.commit(digest(&data)).unwrap_err();
    assert!(matches!(err, Error::InvalidPath { .. }), "{err}");
    assert!(fs::read_dir(outside.path()).expect("list").next().is_none());
}

#[test]
fn directory_destination_is_a_conflict() {
    let f = fixture();
    fs::create_dir_all(f.root.path().join("releases/beat")).expect("mkdir");
    let err = f.offer(&request("releases/beat", b"x", false)).unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
}

/// Offers `req` on another thread; the handle yields its result.
fn offer_elsewhere(f: &Fixture, req: &WriteFile) -> std::thread::JoinHandle<Result<Offer>> {
    let (root, req, limits) = (f.root.clone(), req.clone(), f.limits.clone());
    std::thread::spawn(move || offer(&root, &req, &limits))
}

/// A fresh fixture holding one offer of 1,000 bytes to `path`: the content, the
/// request and the offer.
fn offered(path: &str, known: bool) -> (Fixture, Vec<u8>, WriteFile, Offer) {
    let f = fixture();
    let data = content(1_000);
    let req = request(path, &data, known);
    let offer = f.offer(&req).expect("offer");
    (f, data, req, offer)
}

#[test]
fn a_repeated_transfer_takes_over_and_resumes() {
    let (f, data, req, first) = offered("same.bin", true);
    let first_wanted = first.wanted();
    let mut receiver = begin(first, 0).expect("begin");
    send(&mut receiver, &data[..300]);
    assert!(!first_wanted.is_cancelled());

    // The repeat asks the holder to let go and waits for it, not a refusal.
    let second = offer_elsewhere(&f, &req);
    assert!(
        crate::wait::until_blocking(TAKE_OVER_WAIT, || first_wanted.is_cancelled()),
        "the holder is asked to let go"
    );
    assert!(!second.is_finished(), "the newcomer waits for the holder");
    drop(receiver); // the holder stops, keeping its bytes
    let second = second.join().expect("join").expect("takes over");
    assert_eq!(second.have, 300, "resumes from what the holder received");
    let mut receiver = begin(second, 300).expect("begin");
    send(&mut receiver, &data[300..]);
    receiver.commit(digest(&data)).expect("commit");
    f.assert_landed("same.bin", &data);
}

#[test]
fn the_same_content_elsewhere_takes_over_too_other_content_is_not_held_up() {
    let (f, data, _, first) = offered("same.bin", true);
    let wanted = first.wanted();
    // Other content goes through while the first transfer holds its staging.
    let other = content(999);
    push(&f, &request("other.bin", &other, true), &other).expect("other push");
    assert!(!wanted.is_cancelled());
    // The same digest to another destination shares the staging: it takes over.
    let copy = offer_elsewhere(&f, &request("copy.bin", &data, true));
    assert!(crate::wait::until_blocking(TAKE_OVER_WAIT, || wanted.is_cancelled()));
    drop(first);
    let copy = copy.join().expect("join").expect("takes over");
    assert_eq!(copy.have, 0);
    // Without a digest, the key is the path and size: a repeat takes over as well.
    let unknown = request("nodigest.bin", &data, false);
    let held = f.offer(&unknown).expect("offer");
    let wanted = held.wanted();
    let repeat = offer_elsewhere(&f, &unknown);
    assert!(crate::wait::until_blocking(TAKE_OVER_WAIT, || wanted.is_cancelled()));
    drop(held);
    repeat.join().expect("join").expect("takes over");
    drop(copy);
}

#[test]
fn sweep_removes_stale_parts_only() {
    let (f, data, _, held) = offered("held.bin", false);
    let mut receiver = begin(held, 0).expect("begin");
    send(&mut receiver, &data[..10]);
    let stale_req = request("stale.bin", &data, false);
    let mut stale = f.receiver(&stale_req);
    send(&mut stale, &data[..10]);
    drop(stale);

    assert_eq!(sweep_stale(&f.root, STALE_STAGING_AGE).expect("sweep"), 0);
    assert_eq!(sweep_stale(&f.root, Duration::ZERO).expect("sweep"), 1);
    assert_eq!(staging_files(&f).len(), 1, "the held part stays");
    send(&mut receiver, &data[10..]);
    receiver.commit(digest(&data)).expect("commit");
}
