//! Release output logs: `.erel/logs/<name>.log`, appended to by the release itself.
//!
//! The agent opens the log with `O_APPEND` and hands the descriptor to the child as its
//! stdout and stderr, so output never passes through the agent and the release keeps
//! logging when the agent is gone. The size cap is kept by copy-truncate (copy to
//! `<name>.log.1`, truncate to zero), which is safe because the child appends.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use erel_proto::OUTPUT_TAIL_MAX;

use crate::error::{Error, Result};
use crate::root::Root;

/// Permission bits of a new log file.
const LOG_MODE: u32 = 0o640;

/// `.erel/logs/<name>.log`.
pub(crate) fn log_path(root: &Root, name: &str) -> PathBuf {
    root.state("logs").join(format!("{name}.log"))
}

/// The rotated log beside `log`: `<name>.log.1`.
fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Opens the log of a release for appending (creating it), and writes `header` as one
/// line. The returned file is what the child gets as stdout and stderr.
pub(crate) fn open_for_child(path: &Path, header: &str) -> Result<File> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_MODE)
        .open(path)
        .map_err(|e| Error::io("open log", path, e))?;
    file.write_all(format!("{header}\n").as_bytes())
        .map_err(|e| Error::io("write log", path, e))?;
    Ok(file)
}

/// Copy-truncates the log when it is larger than `max_bytes`. Returns whether it did.
pub(crate) fn rotate_if_needed(path: &Path, max_bytes: u64) -> Result<bool> {
    let len = match fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("inspect log", path, e)),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    let rotated = rotated_path(path);
    fs::copy(path, &rotated).map_err(|e| Error::io("copy log to", &rotated, e))?;
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(|e| Error::io("truncate log", path, e))?;
    Ok(true)
}

/// The last bytes of a file, at most `max`; empty when it does not exist.
fn read_tail(path: &Path, max: usize) -> Vec<u8> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return Vec::new();
    };
    let start = len.saturating_sub(max as u64);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::with_capacity(max.min(len as usize));
    if file.take(max as u64).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    bytes
}

/// The last [`OUTPUT_TAIL_MAX`] bytes of a release's output, as lossy UTF-8 cut at a
/// character boundary. When the log was just rotated, its end is taken from the rotated
/// copy.
pub(crate) fn output_tail(path: &Path) -> String {
    let mut bytes = read_tail(path, OUTPUT_TAIL_MAX);
    if bytes.len() < OUTPUT_TAIL_MAX {
        let mut older = read_tail(&rotated_path(path), OUTPUT_TAIL_MAX - bytes.len());
        older.extend_from_slice(&bytes);
        bytes = older;
    }
    tail_text(&bytes, OUTPUT_TAIL_MAX)
}

/// Lossy UTF-8 of the end of `bytes`, at most `max` bytes long, starting at a character.
fn tail_text(bytes: &[u8], max: usize) -> String {
    // Skip a character cut in half at the front.
    let start = bytes
        .iter()
        .take(4)
        .position(|b| b & 0b1100_0000 != 0b1000_0000)
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&bytes[start..]);
    // Replacement characters can make the text longer than the bytes it came from.
    let mut cut = text.len().saturating_sub(max);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_string()
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`, for log lines.
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(utc_now().len(), "2024-01-01T00:00:00Z".len());
    }

    #[test]
    fn tail_is_bounded_and_starts_at_a_character() {
        let text = "é".repeat(3000);
        let tail = tail_text(&text.as_bytes()[1..], OUTPUT_TAIL_MAX);
        assert!(tail.len() <= OUTPUT_TAIL_MAX);
        assert!(tail.chars().all(|c| c == 'é'));
        let invalid = vec![0xffu8; 3000];
        let tail = tail_text(&invalid, OUTPUT_TAIL_MAX);
        assert!(tail.len() <= OUTPUT_TAIL_MAX && !tail.is_empty());
    }

    #[test]
    fn rotation_copies_and_truncates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.log");
        let mut file = open_for_child(&path, "--- header ---").expect("open");
        file.write_all(&[b'x'; 100]).expect("write");
        assert!(!rotate_if_needed(&path, 1000).expect("check"));
        assert!(rotate_if_needed(&path, 50).expect("rotate"));
        assert_eq!(fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(fs::metadata(rotated_path(&path)).expect("meta").len(), 115);
        // The appending writer continues at the start of the truncated file.
        file.write_all(b"after\n").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"after\n");
        let tail = output_tail(&path);
        assert!(tail.ends_with("xxxxafter\n"), "{tail:?}");
    }
}
