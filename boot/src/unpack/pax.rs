//! PAX extended header records (POSIX.1-2001, `pax` "Extended Header Keywords"; GNU tar
//! manual, "Extended Header Keywords" and "Storing Sparse Files"): which keywords the
//! agent understands, which it knowingly ignores, and which it refuses.
//!
//! A record is `"<length> <keyword>=<value>\n"`; the tar crate splits them and hands
//! each record over. What a keyword means decides what happens to it:
//!
//! - **understood**: `path`, `linkpath`, `size`, and the GNU sparse keywords
//!   (`GNU.sparse.{name,major,minor,realsize,size,numblocks,offset,numbytes,map}`, formats
//!   0.0, 0.1 and 1.0). Each may appear once (offsets and sizes of format 0.0 excepted),
//!   and numbers are plain decimal digits, as GNU tar requires.
//! - **ignored**, because the agent does not apply that metadata, as GNU tar does not
//!   by default either: times (`atime`, `ctime`, `mtime`), owners (`uid`, `gid`,
//!   `uname`, `gname`), `comment`, `charset`, `hdrcharset`, extended attributes and ACLs
//!   (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`, `SCHILY.acl.*`), star's and libarchive's
//!   inode bookkeeping (`SCHILY.dev`, `SCHILY.ino`, `SCHILY.nlink`, `SCHILY.fflags`,
//!   `LIBARCHIVE.creationtime`), GNU incremental listings (`GNU.dumpdir`) and volume
//!   labels (`GNU.volume.label`).
//! - **refused**, naming the keyword: multi-volume keywords (other `GNU.volume.*`), and every
//!   other keyword, since it may change what the entry is in a way the agent would not
//!   reproduce. In a global header (`g`), which applies to every following entry, only
//!   ignored keywords are accepted.

use std::collections::HashSet;

use tar::PaxExtensions;

use super::sparse::{regions, Region};

/// Why records were not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The records cannot be read: the archive is damaged or hostile.
    Malformed(String),
    /// The records are readable but ask for something the agent does not do.
    Unsupported(String),
}

/// Refuses records that cannot be read.
pub(super) fn malformed<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Malformed(reason.into()))
}

/// Refuses records that ask for what the agent does not do.
pub(super) fn unsupported<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Unsupported(reason.into()))
}

/// What the PAX records of one entry say, as far as the agent applies them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct LocalPax {
    /// `path`: the entry's name.
    pub(super) path: Option<Vec<u8>>,
    /// `linkpath`: the target of a link entry.
    pub(super) linkpath: Option<Vec<u8>>,
    /// `size`: bytes of data that follow the header.
    pub(super) size: Option<u64>,
    /// The GNU sparse description, when the entry is a PAX sparse file.
    pub(super) sparse: Option<PaxSparse>,
}

/// A GNU sparse file stored in PAX format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PaxSparse {
    /// `GNU.sparse.name`: the file's real name (formats 0.1 and 1.0 store the entry
    /// under `<dir>/GNUSparseFile.<pid>/<name>`).
    pub(super) name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` or `GNU.sparse.size`: the size of the expanded file, bytes.
    pub(super) real_size: u64,
    /// Where the map of data regions is.
    pub(super) map: MapSource,
}

/// Where a PAX sparse file's map of data regions is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MapSource {
    /// Formats 0.0 (`GNU.sparse.offset`/`numbytes` pairs) and 0.1 (`GNU.sparse.map`):
    /// in the records.
    Records(Vec<Region>),
    /// Format 1.0: at the start of the entry's data, as decimal lines.
    Data,
}

/// What the agent does with a keyword.
enum Keyword<'a> {
    Path,
    LinkPath,
    Size,
    /// `GNU.sparse.<rest>`, one of the understood ones.
    Sparse(&'a str),
    Ignored,
    Volume,
    Unknown,
}

/// Keywords whose metadata the agent does not apply, separated by spaces.
const IGNORED: &str = "atime ctime mtime uid gid uname gname comment charset hdrcharset \
                       SCHILY.dev SCHILY.ino SCHILY.nlink SCHILY.fflags \
                       LIBARCHIVE.creationtime GNU.dumpdir GNU.volume.label";

const IGNORED_PREFIXES: &[&str] = &["SCHILY.xattr.", "LIBARCHIVE.xattr.", "SCHILY.acl."];

/// The understood `GNU.sparse.*` keywords, separated by spaces.
const SPARSE_KEYS: &str = "name major minor realsize size numblocks offset numbytes map";

fn classify(key: &str) -> Keyword<'_> {
    match key {
        "path" => Keyword::Path,
        "linkpath" => Keyword::LinkPath,
        "size" => Keyword::Size,
        _ if IGNORED.split_whitespace().any(|k| k == key) => Keyword::Ignored,
        _ if IGNORED_PREFIXES.iter().any(|p| key.starts_with(p)) => Keyword::Ignored,
        _ if key.starts_with("GNU.volume.") => Keyword::Volume,
        _ => match key.strip_prefix("GNU.sparse.") {
            Some(rest) if SPARSE_KEYS.split(' ').any(|k| k == rest) => Keyword::Sparse(rest),
            _ => Keyword::Unknown,
        },
    }
}

fn unknown(key: &str, shown: &str) -> Refusal {
    Refusal::Unsupported(format!(
        "{shown} keyword '{key}' is not supported: the agent understands path, linkpath, size \
         and GNU sparse maps, and ignores times, owners, comments and extended attributes"
    ))
}

fn volume(key: &str) -> Refusal {
    Refusal::Unsupported(format!(
        "PAX keyword '{key}' belongs to a multi-volume archive; unpack a single-volume archive"
    ))
}

/// Why a record could not be read. The tar crate splits records at newlines, so a
/// value holding one (legal in PAX, where each record carries its length) reads as a
/// record whose length is wrong, like a damaged one.
fn unreadable(e: &std::io::Error) -> String {
    format!(
        "PAX header: {e}: a record's length does not match it, or its value holds a newline, \
         which the agent does not read"
    )
}

/// A decimal number as GNU tar's `decode_num` accepts it: digits only, no sign, no
/// spaces, within `u64`.
pub(super) fn number(what: &str, value: &[u8]) -> Result<u64, Refusal> {
    let digits = std::str::from_utf8(value)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    digits.and_then(|s| s.parse().ok()).ok_or_else(|| {
        Refusal::Malformed(format!(
            "{what} is '{}', not a decimal number",
            String::from_utf8_lossy(value).escape_default()
        ))
    })
}

/// Reads the records of a global header (`g`): only keywords the agent ignores are
/// accepted, since any other one would change every entry that follows.
pub(super) fn check_global(data: &[u8]) -> Result<(), Refusal> {
    for record in PaxExtensions::new(data) {
        let record =
            record.map_err(|e| Refusal::Malformed(format!("global {}", unreadable(&e))))?;
        let key = record
            .key()
            .map_err(|_| Refusal::Malformed("global PAX header: a keyword is not UTF-8".into()))?;
        match classify(key) {
            Keyword::Ignored => {}
            Keyword::Volume => return Err(volume(key)),
            Keyword::Unknown => return Err(unknown(key, "global PAX header")),
            Keyword::Path | Keyword::LinkPath | Keyword::Size | Keyword::Sparse(_) => {
                return Err(Refusal::Unsupported(format!(
                    "global PAX header sets '{key}' for every following entry, which the agent \
                     does not apply; put it in each entry's own header"
                )));
            }
        }
    }
    Ok(())
}

/// The GNU sparse keywords of one entry, as read.
#[derive(Default)]
struct SparseKeys {
    name: Option<Vec<u8>>,
    major: Option<u64>,
    minor: Option<u64>,
    real_size: Option<u64>,
    numblocks: Option<u64>,
    /// `GNU.sparse.offset` / `GNU.sparse.numbytes` pairs, in order (format 0.0).
    pairs: Vec<Region>,
    /// An offset waiting for its `numbytes`.
    pending_offset: Option<u64>,
    /// `GNU.sparse.map` (format 0.1).
    map: Option<Vec<Region>>,
}

/// Reads the records of an entry's own extended header (`x`).
pub(super) fn read_local(records: Option<PaxExtensions<'_>>) -> Result<LocalPax, Refusal> {
    let mut out = LocalPax::default();
    let Some(records) = records else {
        return Ok(out);
    };
    let mut sparse: Option<SparseKeys> = None;
    let mut seen = HashSet::new();
    for record in records {
        let record = record.map_err(|e| Refusal::Malformed(unreadable(&e)))?;
        let key = record
            .key()
            .map_err(|_| Refusal::Malformed("PAX header: a keyword is not UTF-8".into()))?;
        let value = record.value_bytes();
        let kind = classify(key);
        let repeatable = matches!(
            kind,
            Keyword::Ignored | Keyword::Sparse("offset") | Keyword::Sparse("numbytes")
        );
        if !repeatable && !seen.insert(key) {
            return unsupported(format!(
                "PAX keyword '{key}' appears twice; readers disagree on which one counts"
            ));
        }
        match kind {
            Keyword::Path => out.path = Some(value.to_vec()),
            Keyword::LinkPath => out.linkpath = Some(value.to_vec()),
            Keyword::Size => out.size = Some(number("PAX size", value)?),
            Keyword::Ignored => {}
            Keyword::Volume => return Err(volume(key)),
            Keyword::Unknown => return Err(unknown(key, "PAX")),
            Keyword::Sparse(rest) => {
                sparse_key(sparse.get_or_insert_default(), key, rest, value)?;
            }
        }
    }
    out.sparse = sparse.map(sparse_description).transpose()?;
    Ok(out)
}

fn sparse_key(sparse: &mut SparseKeys, key: &str, rest: &str, value: &[u8]) -> Result<(), Refusal> {
    match rest {
        "name" => sparse.name = Some(value.to_vec()),
        "major" => sparse.major = Some(number(key, value)?),
        "minor" => sparse.minor = Some(number(key, value)?),
        "realsize" | "size" => {
            if sparse.real_size.is_some() {
                return unsupported("both GNU.sparse.size and GNU.sparse.realsize are set");
            }
            sparse.real_size = Some(number(key, value)?);
        }
        "numblocks" => sparse.numblocks = Some(number(key, value)?),
        // GNU tar sizes the map from GNU.sparse.numblocks and reports any region
        // listed before it, or beyond its count, as excess.
        "offset" | "map" if sparse.numblocks.is_none() => {
            return malformed(format!(
                "{key} comes before GNU.sparse.numblocks, which says how many regions follow"
            ));
        }
        "offset" => {
            if sparse.pending_offset.is_some() {
                return malformed("GNU.sparse.offset without its GNU.sparse.numbytes");
            }
            sparse.pending_offset = Some(number(key, value)?);
        }
        "numbytes" => {
            let Some(offset) = sparse.pending_offset.take() else {
                return malformed("GNU.sparse.numbytes without a GNU.sparse.offset before it");
            };
            sparse.pairs.push(Region {
                offset,
                length: number(key, value)?,
            });
        }
        "map" => {
            let numbers = if value.is_empty() {
                Vec::new()
            } else {
                value
                    .split(|b| *b == b',')
                    .map(|n| number("a GNU.sparse.map number", n))
                    .collect::<Result<Vec<_>, _>>()?
            };
            if numbers.len() % 2 != 0 {
                return malformed(
                    "GNU.sparse.map holds an odd count of numbers; it lists offset,size pairs",
                );
            }
            sparse.map = Some(regions(&numbers));
        }
        _ => unreachable!("classify only passes the keys in SPARSE_KEYS"),
    }
    Ok(())
}

/// Turns the sparse keywords into one of the three GNU formats, or refuses.
fn sparse_description(sparse: SparseKeys) -> Result<PaxSparse, Refusal> {
    if sparse.pending_offset.is_some() {
        return malformed("the last GNU.sparse.offset has no GNU.sparse.numbytes");
    }
    let Some(real_size) = sparse.real_size else {
        return malformed("GNU sparse keywords without GNU.sparse.realsize or GNU.sparse.size");
    };
    let in_records = !sparse.pairs.is_empty() || sparse.map.is_some();
    let map = match (sparse.major, sparse.minor) {
        (Some(1), None | Some(0)) => {
            if in_records || sparse.numblocks.is_some() {
                return malformed(
                    "GNU sparse format 1.0 keeps its map in the data, yet the header lists one",
                );
            }
            MapSource::Data
        }
        (None | Some(0), None | Some(0) | Some(1)) => {
            if !sparse.pairs.is_empty() && sparse.map.is_some() {
                return unsupported("both GNU.sparse.map and GNU.sparse.offset/numbytes are set");
            }
            let regions = sparse.map.unwrap_or(sparse.pairs);
            if regions.is_empty() {
                return malformed("GNU sparse file without any region in its map");
            }
            let count = sparse.numblocks.unwrap_or(0);
            if count != regions.len() as u64 {
                return malformed(format!(
                    "GNU.sparse.numblocks says {count} regions, the map lists {}",
                    regions.len()
                ));
            }
            MapSource::Records(regions)
        }
        (major, minor) => {
            return unsupported(format!(
                "GNU sparse format {}.{} is not supported (0.0, 0.1 and 1.0 are)",
                major.unwrap_or(0),
                minor.unwrap_or(0)
            ));
        }
    };
    Ok(PaxSparse {
        name: sparse.name,
        real_size,
        map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(pairs: &[(&str, &str)]) -> Vec<u8> {
        let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        crate::unpack::tests::pax_records(&pairs)
    }

    fn local(pairs: &[(&str, &str)]) -> Result<LocalPax, Refusal> {
        let data = records(pairs);
        read_local(Some(PaxExtensions::new(&data)))
    }

    fn unsupported(result: Result<LocalPax, Refusal>, needle: &str) {
        match result {
            Err(Refusal::Unsupported(reason)) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected a refusal naming {needle:?}, got {other:?}"),
        }
    }

    fn malformed(result: Result<LocalPax, Refusal>, needle: &str) {
        match result {
            Err(Refusal::Malformed(reason)) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected malformed naming {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn understood_and_ignored_keywords() {
        let pax = local(&[
            ("path", "a/b"),
            ("linkpath", "c"),
            ("size", "12"),
            ("mtime", "1700000000.5"),
            ("atime", "1"),
            ("uid", "1000"),
            ("uname", "me"),
            ("SCHILY.xattr.user.x", "y"),
            ("LIBARCHIVE.xattr.user.z", "eQ=="),
            ("comment", "hi"),
        ])
        .expect("accepted");
        assert_eq!(pax.path.as_deref(), Some(&b"a/b"[..]));
        assert_eq!(pax.linkpath.as_deref(), Some(&b"c"[..]));
        assert_eq!(pax.size, Some(12));
        assert!(pax.sparse.is_none());
    }

    #[test]
    fn unknown_volume_and_repeated_keywords_are_refused() {
        unsupported(local(&[("SCHILY.filetype", "socket")]), "'SCHILY.filetype'");
        unsupported(local(&[("realtime.any", "1")]), "'realtime.any'");
        unsupported(local(&[("GNU.sparse.weird", "1")]), "'GNU.sparse.weird'");
        unsupported(local(&[("GNU.volume.offset", "512")]), "multi-volume");
        unsupported(local(&[("path", "a"), ("path", "b")]), "twice");
        unsupported(local(&[("size", "1"), ("size", "1")]), "twice");
        malformed(local(&[("size", "+5")]), "'+5'");
        malformed(local(&[("size", " 5")]), "not a decimal");
        malformed(local(&[("size", "")]), "not a decimal");
        malformed(
            local(&[("size", "99999999999999999999999")]),
            "not a decimal",
        );
        // A record whose length does not match.
        let data = b"99 path=x\n".to_vec();
        assert!(matches!(
            read_local(Some(PaxExtensions::new(&data))),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn global_headers_accept_only_ignored_keywords() {
        check_global(&records(&[("comment", "git"), ("mtime", "1")])).expect("ok");
        for key in ["path", "linkpath", "size", "GNU.sparse.realsize"] {
            let err = check_global(&records(&[(key, "1")])).unwrap_err();
            assert!(
                matches!(&err, Refusal::Unsupported(r) if r.contains("every following")),
                "{err:?}"
            );
        }
        assert!(check_global(&records(&[("foo", "1")])).is_err());
        assert!(check_global(b"5 x\n").is_err());
    }

    #[test]
    fn sparse_formats() {
        let v00 = local(&[
            ("GNU.sparse.size", "4096"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "512"),
            ("GNU.sparse.offset", "4096"),
            ("GNU.sparse.numbytes", "0"),
        ])
        .expect("0.0");
        let sparse = v00.sparse.expect("sparse");
        assert_eq!(sparse.real_size, 4096);
        assert_eq!(
            sparse.map,
            MapSource::Records(vec![
                Region {
                    offset: 0,
                    length: 512
                },
                Region {
                    offset: 4096,
                    length: 0
                }
            ])
        );
        let v01 = local(&[
            ("GNU.sparse.major", "0"),
            ("GNU.sparse.minor", "1"),
            ("GNU.sparse.name", "d/f"),
            ("GNU.sparse.size", "10"),
            ("GNU.sparse.numblocks", "1"),
            ("GNU.sparse.map", "5,5"),
        ])
        .expect("0.1")
        .sparse
        .expect("sparse");
        assert_eq!(v01.name.as_deref(), Some(&b"d/f"[..]));
        let v10 = local(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "f"),
            ("GNU.sparse.realsize", "10"),
        ])
        .expect("1.0")
        .sparse
        .expect("sparse");
        assert_eq!(v10.map, MapSource::Data);

        unsupported(
            local(&[("GNU.sparse.major", "2"), ("GNU.sparse.realsize", "1")]),
            "format 2.0",
        );
        unsupported(
            local(&[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "1"),
                ("GNU.sparse.realsize", "1"),
            ]),
            "format 1.1",
        );
        malformed(
            local(&[("GNU.sparse.numblocks", "1"), ("GNU.sparse.map", "0,1")]),
            "realsize",
        );
        malformed(
            local(&[
                ("GNU.sparse.size", "4"),
                ("GNU.sparse.numblocks", "2"),
                ("GNU.sparse.map", "0,1,2"),
            ]),
            "odd",
        );
        malformed(
            local(&[("GNU.sparse.size", "4"), ("GNU.sparse.map", "0,4")]),
            "before GNU.sparse.numblocks",
        );
        malformed(
            local(&[
                ("GNU.sparse.size", "4"),
                ("GNU.sparse.offset", "0"),
                ("GNU.sparse.numbytes", "4"),
                ("GNU.sparse.numblocks", "1"),
            ]),
            "before GNU.sparse.numblocks",
        );
        malformed(
            local(&[
                ("GNU.sparse.size", "4"),
                ("GNU.sparse.numblocks", "2"),
                ("GNU.sparse.map", "0,4"),
            ]),
            "numblocks",
        );
        malformed(
            local(&[("GNU.sparse.size", "4"), ("GNU.sparse.numbytes", "4")]),
            "without a GNU.sparse.offset",
        );
        malformed(
            local(&[
                ("GNU.sparse.size", "4"),
                ("GNU.sparse.numblocks", "1"),
                ("GNU.sparse.offset", "4"),
            ]),
            "no GNU.sparse.numbytes",
        );
        malformed(
            local(&[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.realsize", "4"),
                ("GNU.sparse.numblocks", "1"),
                ("GNU.sparse.map", "0,4"),
            ]),
            "1.0",
        );
    }
}
