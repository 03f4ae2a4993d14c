//! A dependency-free SVG plot of a run: throughput (msgs/s) and send→deliver latency
//! percentiles over time, one panel each. Axis ticks are round numbers (1, 2, 2.5 or 5 × a power
//! of ten), legends sit above their panel (never over the data), and a second without a latency
//! (nothing delivered) is a gap in the line, not a point at 0 ms.

use std::fmt::Write;

use crate::coord::Sample;

const W: f64 = 900.0;
const PH: f64 = 260.0;
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 40.0;
const GAP: f64 = 70.0;

type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> Option<f64> + 'a>);

/// A round tick step that divides `max` into at most `n` steps.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

/// A tick label with as many decimals as the step has (none for 200, two for 0.25).
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-9 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    format!("{v:.decimals$}")
}

fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    samples: &[Sample],
    series: &[Series],
) {
    let pw = W - ML - MR;
    // Axes: time from 0 to a round number of seconds, values from 0 to a round number.
    let t_last = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let t_step = nice_step(t_last, 6.0).max(1.0);
    let t_max = (t_last / t_step).ceil() * t_step;
    let v_last = samples
        .iter()
        .flat_map(|s| series.iter().filter_map(move |(_, _, f)| f(s)))
        .fold(0.0_f64, f64::max);
    let v_step = nice_step(if v_last > 0.0 { v_last } else { 1.0 }, 4.0);
    let v_max = ((v_last / v_step).ceil() * v_step).max(v_step);
    let x = |t: f64| ML + t / t_max * pw;
    let y = |v: f64| top + PH - v / v_max * PH;
    let _ = write!(
        out,
        r##"<rect x="{ML}" y="{top}" width="{pw}" height="{PH}" fill="none" stroke="#888"/><text x="{ML}" y="{}" font-size="14">{title}</text>"##,
        top - 22.0
    );
    // Legend: one row above the panel, right of the title.
    for (k, (name, color, _)) in series.iter().enumerate() {
        let lx = ML + 10.0 + 110.0 * k as f64;
        let _ = write!(
            out,
            r##"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}" font-size="12" fill="{color}">{name}</text>"##,
            lx + 18.0,
            top - 10.0,
            top - 10.0,
            lx + 22.0,
            top - 6.0,
        );
    }
    let mut v = 0.0;
    while v <= v_max + v_step / 2.0 {
        let yy = y(v);
        let _ = write!(
            out,
            r##"<line x1="{ML}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" font-size="11" text-anchor="end">{} {unit}</text>"##,
            ML + pw,
            ML - 4.0,
            yy + 4.0,
            tick_label(v, v_step),
        );
        v += v_step;
    }
    let mut t = 0.0;
    while t <= t_max + t_step / 2.0 {
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">{} s</text>"##,
            x(t),
            top + PH + 14.0,
            tick_label(t, t_step),
        );
        t += t_step;
    }
    // Each series: one polyline per run of seconds that have a value.
    for (_, color, f) in series {
        let mut runs: Vec<Vec<String>> = vec![Vec::new()];
        for s in samples {
            match f(s) {
                Some(v) => {
                    runs.last_mut()
                        .expect("never empty")
                        .push(format!("{:.1},{:.1}", x(s.t), y(v)))
                }
                None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
                None => {}
            }
        }
        for pts in runs.iter().filter(|r| !r.is_empty()) {
            let _ = write!(
                out,
                r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
                pts.join(" "),
            );
        }
    }
}

pub fn plot(title: &str, samples: &[Sample]) -> String {
    let h = MT + 2.0 * PH + GAP + 50.0;
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{ML}" y="20" font-size="16">im-loadgen {title}</text>"##
    );
    panel(
        &mut out,
        MT + 20.0,
        "throughput",
        "/s",
        samples,
        &[
            (
                "sent/s",
                "#1f77b4",
                Box::new(|s: &Sample| Some(s.sent_per_s)),
            ),
            (
                "acked/s",
                "#2ca02c",
                Box::new(|s: &Sample| Some(s.acked_per_s)),
            ),
            (
                "delivered/s",
                "#d62728",
                Box::new(|s: &Sample| Some(s.delivered_per_s)),
            ),
        ],
    );
    panel(
        &mut out,
        MT + 20.0 + PH + GAP,
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

    /// The tick labels of the panel whose labels end with `unit`, in drawing order.
    fn ticks(svg: &str, unit: &str) -> Vec<String> {
        svg.split("text-anchor=\"")
            .filter_map(|p| p.split_once('>'))
            .filter_map(|(_, rest)| rest.split_once("</text>"))
            .map(|(label, _)| label.to_string())
            .filter(|l| l.ends_with(unit))
            .collect()
    }

    #[test]
    fn plot_is_svg_with_both_panels_round_ticks_and_gaps_for_seconds_without_latency() {
        let s: Vec<Sample> = (1..=5)
            .map(|i| Sample {
                t: i as f64,
                sent_per_s: 110.0 * i as f64,
                // Second 3 delivered nothing: no latency.
                deliver_p99_ms: (i != 3).then_some(i as f64),
                ..Default::default()
            })
            .collect();
        let svg = plot("c2c", &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("throughput") && svg.contains("latency"));
        // Time: every second once, round; rate: 0 to 600 by 200 (max 550).
        let secs = ticks(&svg, " s");
        assert_eq!(&secs[..6], ["0 s", "1 s", "2 s", "3 s", "4 s", "5 s"]);
        assert_eq!(
            secs[6..],
            secs[..6],
            "the second panel has the same time axis"
        );
        assert_eq!(ticks(&svg, " /s"), ["0 /s", "200 /s", "400 /s", "600 /s"]);
        assert_eq!(ticks(&svg, " ms"), ["0 ms", "2 ms", "4 ms", "6 ms"]);
        // 3 throughput lines; p99 in two pieces around second 3; p50, p99.9 and ack p99 have no
        // value at all and draw nothing.
        assert_eq!(svg.matches("<polyline").count(), 3 + 2);
        // Each legend entry is drawn once, in its series' colour.
        assert_eq!(svg.matches(r##"fill="#ff7f0e">p99</text>"##).count(), 1);
        assert_eq!(plot("empty", &[]).matches("<polyline").count(), 0);
    }

    #[test]
    fn tick_steps_are_round_and_labels_have_the_decimals_they_need() {
        assert_eq!(nice_step(550.0, 4.0), 200.0);
        assert_eq!(nice_step(5.0, 6.0), 1.0);
        assert_eq!(nice_step(0.9, 4.0), 0.25);
        assert_eq!(nice_step(47.0, 4.0), 20.0);
        assert_eq!(tick_label(400.0, 200.0), "400");
        assert_eq!(tick_label(0.5, 0.25), "0.50");
        assert_eq!(tick_label(0.75, 0.25), "0.75");
        assert_eq!(tick_label(0.2, 0.1), "0.2");
        assert_eq!(tick_label(5.0, 2.5), "5.0");
    }
}
