//! A dependency-free SVG plot of a run: throughput (msgs/s) and send→deliver latency
//! percentiles over time, one panel each.

use std::fmt::Write;

use crate::coord::Sample;

const W: f64 = 900.0;
const PH: f64 = 260.0;
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 40.0;
const GAP: f64 = 60.0;

type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> f64 + 'a>);

fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    samples: &[Sample],
    series: &[Series],
) {
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let y_max = samples
        .iter()
        .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    let pw = W - ML - MR;
    let x = |t: f64| ML + t / t_max * pw;
    let y = |v: f64| top + PH - v / y_max * PH;
    let _ = write!(
        out,
        r##"<rect x="{ML}" y="{top}" width="{pw}" height="{PH}" fill="none" stroke="#888"/><text x="{ML}" y="{}" font-size="14">{title}</text>"##,
        top - 8.0
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let yy = y(v);
        let _ = write!(
            out,
            r##"<line x1="{ML}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" font-size="11" text-anchor="end">{v:.1} {unit}</text>"##,
            ML + pw,
            ML - 4.0,
            yy + 4.0,
        );
    }
    for i in 0..=5 {
        let t = t_max * i as f64 / 5.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">{t:.0} s</text>"##,
            x(t),
            top + PH + 14.0
        );
    }
    for (k, (name, color, f)) in series.iter().enumerate() {
        let pts: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(f(s))))
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><text x="{}" y="{}" font-size="12" fill="{color}">{name}</text>"##,
            pts.join(" "),
            ML + pw - 150.0,
            top + 16.0 + 14.0 * k as f64
        );
    }
}

pub fn plot(title: &str, samples: &[Sample]) -> String {
    let h = MT + 2.0 * PH + GAP + 40.0;
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{ML}" y="20" font-size="16">im-loadgen {title}</text>"##
    );
    panel(
        &mut out,
        MT,
        "throughput",
        "/s",
        samples,
        &[
            ("sent/s", "#1f77b4", Box::new(|s: &Sample| s.sent_per_s)),
            ("acked/s", "#2ca02c", Box::new(|s: &Sample| s.acked_per_s)),
            (
                "delivered/s",
                "#d62728",
                Box::new(|s: &Sample| s.delivered_per_s),
            ),
        ],
    );
    panel(
        &mut out,
        MT + PH + GAP,
        "send→deliver latency (per second)",
        "ms",
        samples,
        &[
            ("p50", "#1f77b4", Box::new(|s: &Sample| s.deliver_p50_ms)),
            ("p99", "#ff7f0e", Box::new(|s: &Sample| s.deliver_p99_ms)),
            ("p99.9", "#d62728", Box::new(|s: &Sample| s.deliver_p999_ms)),
            ("ack p99", "#2ca02c", Box::new(|s: &Sample| s.ack_p99_ms)),
        ],
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_svg_with_both_panels() {
        let s: Vec<Sample> = (1..=5)
            .map(|i| Sample {
                t: i as f64,
                sent_per_s: 100.0 * i as f64,
                deliver_p99_ms: i as f64,
                ..Default::default()
            })
            .collect();
        let svg = plot("c2c", &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("throughput") && svg.contains("latency"));
        assert_eq!(plot("empty", &[]).matches("<polyline").count(), 7);
    }
}
