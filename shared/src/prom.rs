//! The Prometheus text exposition format, as every `/metrics` producer of the project writes it.

use std::fmt::Write;

/// `# HELP` and `# TYPE` lines of a metric family (`kind`: `counter` or `gauge`).
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A metric without labels: its header and its one sample.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A metric family with one label: its header and one sample `name{label="v"} value` per item.
pub fn labeled<L: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) {
    header(out, name, kind, help);
    for (v, value) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {value}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_format() {
        let mut s = String::new();
        super::metric(&mut s, "im_x_total", "counter", "Things.", 3);
        assert_eq!(
            s,
            "# HELP im_x_total Things.\n# TYPE im_x_total counter\nim_x_total 3\n"
        );
        let mut s = String::new();
        super::labeled(&mut s, "im_q", "gauge", "Depth.", "core", [(0, 5), (1, 7)]);
        assert_eq!(
            s,
            "# HELP im_q Depth.\n# TYPE im_q gauge\nim_q{core=\"0\"} 5\nim_q{core=\"1\"} 7\n"
        );
    }
}
