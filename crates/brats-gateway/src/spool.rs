//! Where received instances wait for their study to become stable.
//!
//! Each association writes into its own staging folder (`incoming/<n>/`); only a normally
//! released association moves its instances into `studies/<study hash>/`, so instances from an
//! aborted association never reach a job. A study is stable once no association is adding to
//! it and it has been quiet for the configured time, or after a hard maximum wait. Folder names
//! are hashed study UIDs: no patient data in paths. After a restart, every study folder left
//! is picked up again (its instances are kept until its job finishes).

use brats_dicom::phi::UidHasher;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A study being received.
#[derive(Debug, Clone)]
struct StudyState {
    first: Instant,
    last: Instant,
    open: usize,
}

/// The spool folder and the state of the studies in it.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    hasher: UidHasher,
    studies: Mutex<HashMap<String, StudyState>>,
    next: AtomicU64,
}

/// One association's received instances, not yet committed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    files: Vec<(String, PathBuf)>,
}

impl Staging {
    /// The folder to write into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a file written into [`Staging::dir`] for the study with this hash.
    pub fn add(&mut self, study_hash: String, file: PathBuf) {
        self.files.push((study_hash, file));
    }

    /// Instances staged.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether nothing was staged.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Spool {
    /// Opens (creating) the spool under `root`; staging left by a crash is removed (those
    /// associations never completed), study folders are registered as just received.
    pub fn open(root: &Path, hasher: UidHasher) -> std::io::Result<Spool> {
        let incoming = root.join("incoming");
        if incoming.exists() {
            std::fs::remove_dir_all(&incoming)?;
        }
        std::fs::create_dir_all(&incoming)?;
        std::fs::create_dir_all(root.join("studies"))?;
        let now = Instant::now();
        let mut studies = HashMap::new();
        for entry in std::fs::read_dir(root.join("studies"))? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                studies.insert(
                    entry.file_name().to_string_lossy().to_string(),
                    StudyState { first: now, last: now, open: 0 },
                );
            }
        }
        Ok(Spool { root: root.to_path_buf(), hasher, studies: Mutex::new(studies), next: AtomicU64::new(0) })
    }

    /// The hashed name of a study.
    pub fn study_hash(&self, study_uid: &str) -> String {
        self.hasher.hash(study_uid)
    }

    /// The folder of a study's committed instances.
    pub fn study_dir(&self, study_hash: &str) -> PathBuf {
        self.root.join("studies").join(study_hash)
    }

    /// A new staging folder for one association.
    pub fn staging(&self) -> std::io::Result<Staging> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join("incoming").join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Staging { dir, files: Vec::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StudyState>> {
        self.studies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a study as being added to by an open association (call once per association and
    /// study, before its first instance is staged).
    pub fn opened(&self, study_hash: &str) {
        let now = Instant::now();
        let mut s = self.lock();
        let st = s.entry(study_hash.to_string()).or_insert(StudyState { first: now, last: now, open: 0 });
        st.open += 1;
        st.last = now;
    }

    /// Moves a released association's instances into their study folders.
    pub fn commit(&self, staging: Staging, studies: &[String]) -> std::io::Result<()> {
        let result = (|| {
            for (study, file) in &staging.files {
                let dir = self.study_dir(study);
                std::fs::create_dir_all(&dir)?;
                std::fs::rename(file, dir.join(file.file_name().expect("staged files have names")))?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&staging.dir);
        self.closed(studies);
        result
    }

    /// Drops an aborted association's instances.
    pub fn discard(&self, staging: Staging, studies: &[String]) {
        let _ = std::fs::remove_dir_all(&staging.dir);
        self.closed(studies);
    }

    fn closed(&self, studies: &[String]) {
        let now = Instant::now();
        let mut s = self.lock();
        for study in studies {
            if let Some(st) = s.get_mut(study) {
                st.open = st.open.saturating_sub(1);
                st.last = now;
            }
        }
        // A study only an aborted association touched has no folder: forget it.
        s.retain(|h, st| st.open > 0 || self.root.join("studies").join(h).is_dir());
    }

    /// Studies that are ready: no open association and quiet for `quiet`, or waiting longer
    /// than `max_wait`. They are removed from the state (a later instance re-registers them).
    pub fn take_stable(&self, quiet: Duration, max_wait: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut s = self.lock();
        let ready: Vec<String> = s
            .iter()
            .filter(|(_, st)| {
                (st.open == 0 && now.duration_since(st.last) >= quiet) || now.duration_since(st.first) >= max_wait
            })
            .map(|(h, _)| h.clone())
            .collect();
        for h in &ready {
            s.remove(h);
        }
        ready
    }

    /// Bytes free on the spool's file system (`statvfs`).
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // fsblkcnt_t and c_ulong are 32-bit on some targets
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_released_associations_reach_a_study_and_stability_waits_for_them() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), UidHasher::default()).unwrap();
        let study = spool.study_hash("1.2.3");
        // Aborted: nothing kept, the study forgotten.
        let mut a = spool.staging().unwrap();
        spool.opened(&study);
        std::fs::write(a.dir().join("x.dcm"), b"x").unwrap();
        a.add(study.clone(), a.dir().join("x.dcm"));
        spool.discard(a, std::slice::from_ref(&study));
        assert!(!spool.study_dir(&study).exists());
        assert!(spool.take_stable(Duration::ZERO, Duration::from_secs(60)).is_empty());
        // Released: committed; not stable while another association is open.
        let mut b = spool.staging().unwrap();
        spool.opened(&study);
        std::fs::write(b.dir().join("y.dcm"), b"y").unwrap();
        b.add(study.clone(), b.dir().join("y.dcm"));
        spool.opened(&study);
        spool.commit(b, std::slice::from_ref(&study)).unwrap();
        assert!(spool.study_dir(&study).join("y.dcm").exists());
        assert!(spool.take_stable(Duration::ZERO, Duration::from_secs(60)).is_empty());
        spool.closed(std::slice::from_ref(&study));
        assert_eq!(spool.take_stable(Duration::ZERO, Duration::from_secs(60)), vec![study.clone()]);
        // A restart picks the folder up again.
        drop(spool);
        let again = Spool::open(tmp.path(), UidHasher::default()).unwrap();
        assert_eq!(again.take_stable(Duration::ZERO, Duration::from_secs(60)), vec![study]);
        assert!(again.free_bytes().unwrap() > 0);
    }
}
