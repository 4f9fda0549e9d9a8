//! Archive unpacking: fuzzed `.tar.gz` or `.tar` bytes unpacked into a fresh root.
//!
//! The input is an archive's bytes, written as `incoming/archive` under a fresh root and
//! unpacked by an `Unpack` request to `releases/app/1`. Checked, besides "nothing
//! panics": the answer is `Unpacked` or an error other than `Internal`; on an error,
//! `dest` does not exist; on success, `dest` is a directory in which no entry is a
//! device, fifo or socket, no file is setuid or setgid, and every symlink that resolves
//! leads inside `dest`; nothing is written beside the root and no staging is left.
#![no_main]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use erel_fuzz::{frame, Fresh};
use erel_proto::{ErrorKind, Request, Response, Unpack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fresh = Fresh::new();
    let root = fresh.root();
    std::fs::create_dir(root.join("incoming")).expect("incoming/");
    std::fs::write(root.join("incoming/archive"), data).expect("the archive");
    let unpack = Request::Unpack(Unpack {
        archive: "incoming/archive".into(),
        dest: "releases/app/1".into(),
        sha256: None,
    });
    let answers = fresh.serve(&frame(&unpack));
    let dest = root.join("releases/app/1");
    match answers.as_slice() {
        [Response::Hello(_), Response::Unpacked(_)] => {
            let dest = dest.canonicalize().expect("dest resolves");
            assert_inside(&dest, &dest);
        }
        [Response::Hello(_), Response::Error(error)] => {
            assert_ne!(
                error.kind,
                ErrorKind::Internal,
                "internal error: {}",
                error.message
            );
            assert!(
                !dest.exists(),
                "dest exists after a refusal: {}",
                error.message
            );
        }
        other => panic!("unexpected answers: {other:?}"),
    }
});

/// Walks `dir` (never through symlinks) asserting what the module documentation says.
fn assert_inside(dest: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read a directory of dest") {
        let path = entry.expect("an entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("an entry's metadata");
        let kind = meta.file_type();
        assert!(
            !(kind.is_block_device()
                || kind.is_char_device()
                || kind.is_fifo()
                || kind.is_socket()),
            "special file unpacked: {}",
            path.display()
        );
        assert_eq!(
            meta.permissions().mode() & 0o6000,
            0,
            "setuid or setgid: {}",
            path.display()
        );
        if kind.is_symlink() {
            if let Ok(target) = path.canonicalize() {
                assert!(
                    target.starts_with(dest),
                    "{} leads to {}",
                    path.display(),
                    target.display()
                );
            }
        } else if kind.is_dir() {
            assert_inside(dest, &path);
        }
    }
}
