//! Text of an error with its causes, for logs and error messages.

/// `e` and its sources, `: `-separated (`a: b: c`): many library errors say little at the top
/// level and keep the cause in [`std::error::Error::source`].
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("commit log")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn every_cause_is_appended_in_order() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&e), "commit log: disk full");
        assert_eq!(error_chain(&e.0), "disk full");
    }
}
