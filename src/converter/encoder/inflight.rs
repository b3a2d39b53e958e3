//! Remembers across process crashes which command the encoder was running, so that a command that
//! ends the process (a crash inside QuickJS, an out-of-memory kill) is given up after its second
//! crash instead of crash-looping the gateway: the downlink consumes it again after every restart.
//!
//! Before each command the encoder thread writes `<origin> <crashes>` to
//! `<data_dir>/encoder.inflight`, and `idle` after it. Only process crashes matter here, so the
//! file is not fsynced: the page cache survives them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::converter::ConvertError;

const FILE_NAME: &str = "encoder.inflight";
/// Markers are written at offset 0 padded to this length; longer origins are cut (a topic name
/// has at most 249 bytes).
const MARKER_LEN: usize = 320;
/// Crashes of one command after which it is given up without running.
const CRASHES: u32 = 2;

pub struct InFlight {
    file: Option<File>,
    /// The command being encoded when the last run died, and how many runs it ended.
    suspect: Option<(String, u32)>,
}

impl InFlight {
    /// Opens the file; a command named in it ended the last run. Without a usable file the guard
    /// is off (a warning says so): encoding itself must not depend on it.
    pub fn open(data_dir: &Path) -> InFlight {
        let path = data_dir.join(FILE_NAME);
        let suspect = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| parse(&text));
        if let Some((origin, crashes)) = &suspect {
            tracing::warn!(command = %origin, crashes, "the last run ended while encoding this command");
        }
        let file = std::fs::create_dir_all(data_dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
            })
            .map_err(|e| {
                tracing::warn!(path = %path.display(), error = %e,
                    "encoder crash guard disabled: cannot write its file");
            })
            .ok();
        InFlight { file, suspect }
    }

    /// Names `origin` as running; `Err(Crashed)` when it already ended the process twice.
    pub fn begin(&mut self, origin: &str) -> Result<(), ConvertError> {
        let crashes = match &self.suspect {
            Some((o, n)) if o == origin => *n,
            _ => 0,
        };
        if crashes >= CRASHES {
            return Err(ConvertError::Crashed);
        }
        self.write(&format!("{origin} {crashes}"));
        Ok(())
    }

    pub fn end(&mut self) {
        self.write("idle");
    }

    fn write(&mut self, text: &str) {
        let Some(file) = &self.file else { return };
        let mut marker = [b' '; MARKER_LEN];
        let n = text.len().min(MARKER_LEN - 1);
        marker[..n].copy_from_slice(&text.as_bytes()[..n]);
        marker[MARKER_LEN - 1] = b'\n';
        if file.write_all_at(&marker, 0).is_err() {
            self.file = None;
        }
    }
}

/// `<origin> <crashes>` → the origin and its crashes counting the run that just ended.
fn parse(text: &str) -> Option<(String, u32)> {
    let text = text.trim_end();
    if text == "idle" {
        return None;
    }
    let (origin, crashes) = text.rsplit_once(' ')?;
    let crashes: u32 = crashes.parse().ok()?;
    Some((origin.trim_end().to_owned(), crashes + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_ended_two_runs_is_not_run_a_third_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = InFlight::open(dir.path());
        first.begin("cmds/0/7").unwrap();
        first.end();
        first.begin("cmds/0/8").unwrap();
        // The process dies here, twice.
        let mut second = InFlight::open(dir.path());
        second.begin("cmds/0/7").unwrap();
        second.begin("cmds/0/8").unwrap();
        let mut third = InFlight::open(dir.path());
        assert_eq!(third.begin("cmds/0/8"), Err(ConvertError::Crashed));
        assert!(third.begin("cmds/0/9").is_ok(), "other commands still run");
        third.end();
        assert!(
            InFlight::open(dir.path()).begin("cmds/0/8").is_ok(),
            "a clean end clears it"
        );
    }
}
