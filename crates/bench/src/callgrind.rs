//! `callgrind`: instructions the proxy executes per `tools/call`, counted by
//! valgrind's callgrind on the in-process pipeline driver
//! (`src/bin/pipeline.rs`).
//!
//! Instructions, unlike time, do not depend on what else the machine is
//! doing, so this is the figure to watch for regressions. Each era is run
//! at a low and a high N and the per-call figure is
//! `(total_high - total_low) / (N_high - N_low)`: start-up (runtime, policy
//! compilation, TLS roots, spool recovery) cancels out.
//!
//! Each pair is run twice: with the demo upstream in the driver's process
//! (everything a call costs on one machine) and with the upstream in a
//! separate process that callgrind does not see (the proxy alone). The
//! difference is the upstream's share. The spool's share (encoding, hashing
//! and writing each record) is read from callgrind_annotate's inclusive cost
//! of its two entry points: the inline append the caller makes with
//! `durability = os` (what the driver runs) and the group-commit thread's
//! loop used with `fsync`.
//!
//! Note: valgrind does not offer the SHA extensions to the program, so the
//! spool's hash chain runs sha2's portable code here; on a CPU with SHA-NI
//! the writer's share is far smaller than counted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Eras driven, as the driver names them.
const ERAS: [&str; 2] = ["legacy", "modern"];
/// The spool's record-writing entry points: inline (`os`) and the
/// group-commit thread (`fsync`). Neither calls the other.
const WRITER: [&str; 2] = [
    "sentinel_spool::writer::Writer::append_now",
    "sentinel_spool::writer::Writer::run",
];

pub async fn run(quick: bool) -> Value {
    tokio::task::spawn_blocking(move || measure(quick))
        .await
        .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

fn measure(quick: bool) -> Value {
    println!("\n== callgrind: instructions per tools/call (1 KB echo argument) ==");
    if !Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        println!("valgrind is not installed: skipped (apt-get install valgrind)");
        return json!({"skipped": "valgrind not installed"});
    }
    // The smoke version counts one era at small N: enough to prove the
    // driver, valgrind and the annotation parsing still work together.
    let (low, high) = if quick { (5, 25) } else { (200, 1200) };
    let eras_run: &[&str] = if quick { &ERAS[1..] } else { &ERAS };
    let driver = match driver() {
        Ok(d) => d,
        Err(e) => {
            println!("pipeline driver unavailable: {e}");
            return json!({"skipped": e});
        }
    };
    let out = driver
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("callgrind-out");
    std::fs::create_dir_all(&out).expect("callgrind output directory");
    let upstream = Upstream::start(&driver);

    let mut eras = serde_json::Map::new();
    let mut profile: Option<(Profile, Profile)> = None;
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>16} {:>14}",
        "era", "total/call", "proxy/call", "upstream/call", "spool write/call", "request path"
    );
    for &era in eras_run {
        let run = |n: u64, up: Option<&str>| {
            let file = out.join(format!(
                "cg.{era}.{n}.{}.out",
                if up.is_some() { "proxy" } else { "all" }
            ));
            callgrind(&driver, era, n, up, &file)
        };
        let all = (run(low, None), run(high, None));
        let alone = (
            run(low, Some(&upstream.url)),
            run(high, Some(&upstream.url)),
        );
        let per = |(a, b): &(Profile, Profile)| {
            (b.counted() as f64 - a.counted() as f64) / (high - low) as f64
        };
        let total = per(&all);
        let proxy = per(&alone);
        let spool = |p: &Profile| WRITER.iter().map(|f| p.inclusive(f)).sum::<u64>() as f64;
        let writer = (spool(&alone.1) - spool(&alone.0)) / (high - low) as f64;
        println!(
            "{era:<8} {total:>14.0} {proxy:>14.0} {:>14.0} {writer:>16.0} {:>14.0}",
            total - proxy,
            proxy - writer
        );
        eras.insert(
            era.into(),
            json!({
                "n_low": low,
                "n_high": high,
                "instructions_per_call": total.round(),
                "proxy_per_call": proxy.round(),
                "upstream_per_call": (total - proxy).round(),
                "spool_writer_per_call": writer.round(),
                "request_path_per_call": (proxy - writer).round(),
            }),
        );
        if era == "modern" {
            profile = Some(alone);
        }
    }
    let mut top = serde_json::Map::new();
    if let Some((a, b)) = profile {
        let per_call = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / (high - low) as f64;
        let mut incl: Vec<(String, f64)> = b
            .inclusive
            .iter()
            .filter(|(f, _)| f.contains("sentinel_"))
            .map(|(f, &c)| (f.clone(), per_call(a.inclusive(f), c)))
            .collect();
        incl.sort_by(|x, y| y.1.total_cmp(&x.1));
        incl.truncate(10);
        let mut own: Vec<(String, f64)> = b
            .own
            .iter()
            .filter(|(f, _)| f.as_str() != "PROGRAM TOTALS")
            .map(|(f, &c)| (f.clone(), per_call(a.own.get(f).copied().unwrap_or(0), c)))
            .collect();
        own.sort_by(|x, y| y.1.total_cmp(&x.1));
        own.truncate(10);
        println!(
            "\nmodern era, proxy alone: top Sentinel functions by inclusive instructions per call"
        );
        for (f, c) in &incl {
            println!("{c:>12.0}  {}", short(f));
        }
        println!("\nmodern era, proxy alone: top functions by own (self) instructions per call");
        for (f, c) in &own {
            println!("{c:>12.0}  {}", short(f));
        }
        let list = |v: Vec<(String, f64)>| {
            v.into_iter()
                .map(|(f, c)| json!({"function": short(&f), "per_call": c.round()}))
                .collect::<Vec<_>>()
        };
        top.insert("top_inclusive_modern".into(), json!(list(incl)));
        top.insert("top_self_modern".into(), json!(list(own)));
    }
    println!("(callgrind files in {})", out.display());
    let mut v = json!({ "eras": eras });
    if let Some(o) = v.as_object_mut() {
        o.extend(top);
    }
    v
}

/// The driver binary next to this one, rebuilt first when cargo ran us.
fn driver() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = me.parent().ok_or("no directory for this binary")?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "sentinel-bench", "--bin", "pipeline"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let ok = c.status().map_err(|e| e.to_string())?.success();
        if !ok {
            return Err("cargo build of the pipeline driver failed".into());
        }
    }
    let d = dir.join("pipeline");
    if !d.exists() {
        return Err(format!(
            "{} missing: cargo build --release -p sentinel-bench --bin pipeline",
            d.display()
        ));
    }
    if dir.file_name().is_none_or(|n| n != "release") {
        println!("warning: not a release build; counts are not comparable");
    }
    Ok(d)
}

/// The demo upstream in its own process, outside callgrind's view.
struct Upstream {
    child: std::process::Child,
    url: String,
}

impl Upstream {
    fn start(driver: &Path) -> Upstream {
        let mut child = Command::new(driver)
            .arg("serve-upstream")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("upstream process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("upstream url");
        Upstream {
            child,
            url: line.trim().to_string(),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Closing its stdin stops it.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One callgrind run's costs.
#[derive(Default)]
struct Profile {
    total: u64,
    /// Inclusive cost by function (the largest line callgrind_annotate gives
    /// for it: inlined parts are listed under their source files too).
    inclusive: HashMap<String, u64>,
    /// Self cost by function (summed over the files its code came from).
    own: HashMap<String, u64>,
}

/// quanta's one-off clock calibration (the metrics exporter's clock) loops
/// until the clock looks stable, so its cost changes from run to run by
/// a few million instructions; it is left out of every total.
const CALIBRATION: &str = "quanta::Calibration::calibrate";

impl Profile {
    /// The total without the time-dependent start-up calibration.
    fn counted(&self) -> u64 {
        self.total.saturating_sub(self.inclusive(CALIBRATION))
    }

    fn inclusive(&self, f: &str) -> u64 {
        self.inclusive.get(f).copied().unwrap_or(0)
    }
}

fn callgrind(driver: &Path, era: &str, n: u64, upstream: Option<&str>, file: &Path) -> Profile {
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(driver)
        .arg(era)
        .arg(n.to_string());
    if let Some(u) = upstream {
        c.args(["--upstream", u]);
    }
    let out = c.output().expect("valgrind runs");
    assert!(
        out.status.success(),
        "pipeline {era} {n} under callgrind failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(file).expect("callgrind output");
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|s| s.trim().parse().ok())
        .expect("callgrind summary line");
    Profile {
        total,
        inclusive: annotate(file, true)
            .into_iter()
            .fold(HashMap::new(), |mut m, (f, c)| {
                let e = m.entry(f).or_insert(0);
                *e = (*e).max(c);
                m
            }),
        own: annotate(file, false)
            .into_iter()
            .fold(HashMap::new(), |mut m, (f, c)| {
                *m.entry(f).or_insert(0) += c;
                m
            }),
    }
}

/// `(function, cost)` lines of callgrind_annotate; empty if it is missing.
fn annotate(file: &Path, inclusive: bool) -> Vec<(String, u64)> {
    let Ok(out) = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--threshold=100")
        .arg("--auto=no")
        .arg(file)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // `  1,234 (12.34%)  file:function [object]`
            let l = l.trim_start();
            let (num, rest) = l.split_once(' ')?;
            let cost: u64 = num.replace(',', "").parse().ok()?;
            let rest = rest.trim_start().strip_prefix('(')?;
            let (_, rest) = rest.split_once(')')?;
            let loc = rest.trim();
            let loc = match loc.rfind(" [") {
                Some(i) if loc.ends_with(']') => &loc[..i],
                _ => loc,
            };
            // A call count, `(1,200x)`, may follow the name.
            let loc = match loc.rfind(" (") {
                Some(i) if loc.ends_with("x)") => &loc[..i],
                _ => loc,
            };
            // `file:function`; paths hold no ':' here, functions do.
            let func = loc.split_once(':').map_or(loc, |(_, f)| f);
            Some((func.to_string(), cost))
        })
        .collect()
}

/// A function name without its generic noise, for the table.
fn short(f: &str) -> String {
    const MAX: usize = 110;
    if f.len() <= MAX {
        return f.to_string();
    }
    let cut = (0..=MAX)
        .rev()
        .find(|&i| f.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &f[..cut])
}
