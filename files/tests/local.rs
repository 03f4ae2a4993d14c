//! The shared behaviours (`conformance`) on the local filesystem backend, directly and through
//! `AnyFiles`.

mod conformance;

use std::fs;
use std::path::PathBuf;

use conformance::{Harness, MAX};
use im_files::{AnyFiles, LocalFiles};

struct Local {
    dir: tempfile::TempDir,
}

fn local() -> Option<Local> {
    Some(Local {
        dir: tempfile::tempdir().unwrap(),
    })
}

fn count(dir: PathBuf) -> usize {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    count(e.path())
                } else {
                    1
                }
            })
            .sum(),
        Err(_) => 0,
    }
}

impl Harness for Local {
    type Store = LocalFiles;
    fn open(&self) -> LocalFiles {
        LocalFiles::open(self.dir.path(), MAX).unwrap()
    }
    fn blobs(&self) -> usize {
        count(self.dir.path().join("blobs"))
    }
    fn upload_leftovers(&self) -> usize {
        count(self.dir.path().join("uploads"))
    }
}

conformance_tests!(local());

/// The same, through the enum the server holds.
mod any {
    use super::*;

    pub struct Any(Local);

    impl Harness for Any {
        type Store = AnyFiles;
        fn open(&self) -> AnyFiles {
            let s = AnyFiles::from(self.0.open());
            assert!(s.completes_inline());
            s
        }
        fn blobs(&self) -> usize {
            self.0.blobs()
        }
        fn upload_leftovers(&self) -> usize {
            self.0.upload_leftovers()
        }
    }

    fn any() -> Option<Any> {
        local().map(Any)
    }

    use crate::conformance;
    conformance_tests!(any());
}
