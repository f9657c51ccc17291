//! The run's loss plot: training loss per step (raw, and smoothed by an exponential moving
//! average) and evaluation loss per evaluation, against the step, as a PNG; and
//! [`write_plot`], which every medcoder plot (the evaluation report's too) is written through.
//!
//! Text (caption, tick labels, axis names, legend) needs a font. plotters renders text with
//! `ab_glyph` from a font registered at run time; the first system TTF found in
//! [`FONT_CANDIDATES`] is used. Without one the plot still has its curves, axes and grid, just
//! no text.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::metrics::MetricsRecord;
use crate::TrainError;

/// Size of the PNG in pixels.
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;

/// The font family name text is drawn with (and the registered font is registered under).
pub const FONT_FAMILY: &str = "sans-serif";

/// System fonts tried, in order; the first that exists and parses is used.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The training curve is smoothed over about one in this many of its points...
const POINTS_PER_SMOOTHING_SPAN: f64 = 20.0;
/// ...but over no more than this many points.
const MAX_SMOOTHING_SPAN: f64 = 100.0;
/// A smoothed curve is drawn only when it averages over at least this many points.
const MIN_SMOOTHING_SPAN: f64 = 2.0;

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const EVAL_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Draw training loss (per step) and evaluation loss (per evaluation) against the step into
/// `path` (PNG, ~1000x600).
///
/// Non-finite values are skipped. With nothing to draw (no records, or no finite loss at all)
/// nothing is written. The file is replaced atomically: rendered to a temp file in the same
/// folder, then renamed over `path`.
pub fn plot_loss_curves(records: &[MetricsRecord], path: &Path) -> Result<(), TrainError> {
    let curves = Curves::from_records(records);
    if curves.is_empty() {
        return Ok(());
    }
    write_plot(path, |target, with_text| render(&curves, target, with_text))
}

/// Write a plot to `path` (PNG) atomically: `render(target, with_text)` draws into the PNG
/// file `target` (a temp file in `path`'s folder, renamed over `path` once drawn). `with_text`
/// is true when a system font is registered (plotters cannot draw text without one); a render
/// with text that fails is retried without.
pub fn write_plot(
    path: &Path,
    render: impl Fn(&Path, bool) -> Result<(), String>,
) -> Result<(), TrainError> {
    let with_text = font_available();
    match write_png(path, with_text, &render) {
        // A font that was registered but fails to render: still draw the plot.
        Err(error) if with_text => {
            tracing::debug!(%error, path = %path.display(), "plot with text failed; drawing it without text");
            write_png(path, false, &render)
        }
        other => other,
    }
}

/// Render into a temp file next to `path` and rename it over `path`.
fn write_png(
    path: &Path,
    with_text: bool,
    render: &dyn Fn(&Path, bool) -> Result<(), String>,
) -> Result<(), TrainError> {
    let plot_error = |message: String| TrainError::Plot {
        path: path.display().to_string(),
        message,
    };
    crate::atomic::write_through(path, &temp_path(path), |temp| {
        render(temp, with_text).map_err(plot_error)
    })
}

/// A temp file in `path`'s folder. It ends in `.png`: the encoder picks the format from the
/// extension.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}.png", std::process::id()))
}

/// Register the first system font found, once per process; whether text can be drawn.
fn font_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        for candidate in FONT_CANDIDATES {
            let Ok(bytes) = std::fs::read(candidate) else {
                continue;
            };
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(font = %candidate, "plot font");
                return true;
            }
        }
        tracing::debug!("no system font found; plots have no text");
        false
    })
}

/// The points to draw, finite values only, sorted by step.
#[derive(Debug, Default)]
struct Curves {
    train: Vec<(i64, f64)>,
    eval: Vec<(i64, f64)>,
}

impl Curves {
    fn from_records(records: &[MetricsRecord]) -> Self {
        let step = |r: &MetricsRecord| i64::try_from(r.step).unwrap_or(i64::MAX);
        let points = |value: fn(&MetricsRecord) -> Option<f64>| {
            let mut points: Vec<(i64, f64)> = records
                .iter()
                .filter_map(|r| value(r).filter(|v| v.is_finite()).map(|v| (step(r), v)))
                .collect();
            points.sort_by_key(|&(s, _)| s);
            points
        };
        Self {
            train: points(|r| r.loss),
            eval: points(|r| r.eval_loss),
        }
    }

    fn is_empty(&self) -> bool {
        self.train.is_empty() && self.eval.is_empty()
    }

    /// Step range and loss range covering every point, padded so no point sits on the frame.
    fn ranges(&self) -> (std::ops::Range<i64>, std::ops::Range<f64>) {
        let all = || self.train.iter().chain(&self.eval);
        let (mut x0, mut x1) = all().fold((i64::MAX, i64::MIN), |(lo, hi), &(s, _)| {
            (lo.min(s), hi.max(s))
        });
        if x0 >= x1 {
            x0 = x0.saturating_sub(1);
            x1 = x1.saturating_add(1);
        }
        let (mut y0, mut y1) = all()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
                (lo.min(v), hi.max(v))
            });
        let pad = if y1 > y0 {
            (y1 - y0) * 0.05
        } else {
            (y0.abs() * 0.1).max(0.1)
        };
        y0 -= pad;
        y1 += pad;
        (x0..x1, y0..y1)
    }
}

/// The smoothing span for a curve of `n` points.
fn smoothing_span(n: usize) -> f64 {
    (n as f64 / POINTS_PER_SMOOTHING_SPAN).clamp(1.0, MAX_SMOOTHING_SPAN)
}

/// Exponential moving average with span `span` (weight `2 / (span + 1)` on each new value),
/// bias-corrected so the first values are not pulled towards zero. A span of 1 returns the
/// values unchanged.
fn ema(values: &[f64], span: f64) -> Vec<f64> {
    let alpha = 2.0 / (span.max(1.0) + 1.0);
    let mut average = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|&v| {
            average = (1.0 - alpha) * average + alpha * v;
            weight = (1.0 - alpha) * weight + alpha;
            average / weight
        })
        .collect()
}

/// Draw the plot into the PNG file `target`. Without text no caption, tick labels, axis
/// names or legend are drawn (plotters cannot draw text without a registered font).
fn render(curves: &Curves, target: &Path, with_text: bool) -> Result<(), String> {
    let root = BitMapBackend::new(target, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;

    let (x_range, y_range) = curves.ranges();
    let (x_lo, x_hi) = (x_range.start, x_range.end);
    let (y_lo, y_hi) = (y_range.start, y_range.end);

    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption("loss", (FONT_FAMILY, 24))
            .x_label_area_size(50)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| e.to_string())?;

    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("step")
            .y_desc("loss")
            .axis_desc_style((FONT_FAMILY, 16))
            .label_style((FONT_FAMILY, 13));
    } else {
        // Axes come with their tick labels; without a font, draw the axis lines below.
        mesh.disable_axes();
    }
    mesh.draw().map_err(|e| e.to_string())?;
    if !with_text {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x_lo, y_hi), (x_lo, y_lo), (x_hi, y_lo)],
                BLACK.stroke_width(1),
            )))
            .map_err(|e| e.to_string())?;
    }

    if !curves.train.is_empty() {
        let span = smoothing_span(curves.train.len());
        let smoothed = span >= MIN_SMOOTHING_SPAN;
        // With a smoothed curve on top the raw one is thin and faint; alone, it is the curve.
        let raw_style = if smoothed {
            TRAIN_COLOR.mix(0.35).stroke_width(1)
        } else {
            TRAIN_COLOR.filled().stroke_width(2)
        };
        let point_size = if curves.train.len() == 1 { 4 } else { 0 };
        chart
            .draw_series(
                LineSeries::new(curves.train.iter().copied(), raw_style).point_size(point_size),
            )
            .map_err(|e| e.to_string())?
            .label("train loss")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_style));

        if smoothed {
            let values: Vec<f64> = curves.train.iter().map(|&(_, v)| v).collect();
            let steps = curves.train.iter().map(|&(s, _)| s);
            let smooth_style = TRAIN_COLOR.stroke_width(3);
            chart
                .draw_series(LineSeries::new(steps.zip(ema(&values, span)), smooth_style))
                .map_err(|e| e.to_string())?
                .label("train loss (EMA)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], smooth_style));
        }
    }

    if !curves.eval.is_empty() {
        let eval_style = EVAL_COLOR.filled().stroke_width(2);
        chart
            .draw_series(LineSeries::new(curves.eval.iter().copied(), eval_style).point_size(4))
            .map_err(|e| e.to_string())?
            .label("eval loss")
            .legend(move |(x, y)| {
                // Composed elements are placed relative to the first one.
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (20, 0)], eval_style)
                    + Circle::new((10, 0), 4, eval_style)
            });
    }

    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| e.to_string())?;
    }

    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn train(step: usize, loss: f64) -> MetricsRecord {
        MetricsRecord {
            step,
            loss: Some(loss),
            lr: Some(1e-4),
            ..Default::default()
        }
    }

    fn eval(step: usize, eval_loss: f64) -> MetricsRecord {
        MetricsRecord {
            step,
            eval_loss: Some(eval_loss),
            ..Default::default()
        }
    }

    /// A noisy, decaying training loss over 300 steps, evaluated every 50.
    fn synthetic() -> Vec<MetricsRecord> {
        let mut records = Vec::new();
        for step in 1..=300usize {
            let t = step as f64;
            let noise = ((t * 12.9898).sin() * 43_758.545).fract() * 0.3;
            records.push(train(step, 2.5 * (-t / 80.0).exp() + 0.4 + noise));
            if step % 50 == 0 {
                records.push(eval(step, 2.5 * (-t / 80.0).exp() + 0.55));
            }
        }
        records
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(
            bytes.len() > 33,
            "too short for a PNG: {} bytes",
            bytes.len()
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (width, height)
    }

    /// The folder's file names, to check no temp file is left behind.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn plot(records: &[MetricsRecord]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        plot_loss_curves(records, &path).unwrap();
        (dir, path)
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(png_size(&bytes), (WIDTH, HEIGHT));
        let dir = path.parent().unwrap();
        assert_eq!(
            names(dir),
            vec!["loss.png".to_string()],
            "no temp file left"
        );
    }

    #[test]
    fn synthetic_run_is_a_png_of_the_right_size() {
        let (_dir, path) = plot(&synthetic());
        assert_png(&path);
    }

    #[test]
    fn empty_writes_nothing() {
        let (dir, path) = plot(&[]);
        assert!(!path.exists());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn records_without_any_loss_write_nothing() {
        let records = vec![
            MetricsRecord {
                step: 1,
                lr: Some(1e-4),
                ..Default::default()
            },
            train(2, f64::NAN),
            eval(3, f64::INFINITY),
        ];
        let (dir, path) = plot(&records);
        assert!(!path.exists());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn nan_and_inf_are_skipped() {
        let mut records = synthetic();
        records[3].loss = Some(f64::NAN);
        records[10].loss = Some(f64::INFINITY);
        records[11].loss = Some(f64::NEG_INFINITY);
        records.push(eval(400, f64::NAN));
        let (_dir, path) = plot(&records);
        assert_png(&path);

        let curves = Curves::from_records(&records);
        assert_eq!(curves.train.len(), 297);
        assert_eq!(curves.eval.len(), 6);
        let (x, y) = curves.ranges();
        assert_eq!(x, 1..300);
        assert!(y.start.is_finite() && y.end.is_finite() && y.start < y.end);
    }

    #[test]
    fn only_training_loss() {
        let records: Vec<_> = synthetic()
            .into_iter()
            .filter(|r| r.loss.is_some())
            .collect();
        let (_dir, path) = plot(&records);
        assert_png(&path);
    }

    #[test]
    fn only_eval_loss() {
        let records: Vec<_> = (1..=5).map(|i| eval(i * 100, 1.0 / i as f64)).collect();
        let (_dir, path) = plot(&records);
        assert_png(&path);
    }

    #[test]
    fn single_point() {
        let (_dir, path) = plot(&[train(0, 1.25)]);
        assert_png(&path);
        let (_dir, path) = plot(&[eval(7, 0.5)]);
        assert_png(&path);
        let (x, y) = Curves::from_records(&[train(0, 1.25)]).ranges();
        assert!(x.start < x.end && y.start < y.end);
        assert!(y.contains(&1.25));
    }

    #[test]
    fn replaces_an_existing_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        std::fs::write(&path, b"old").unwrap();
        plot_loss_curves(&synthetic(), &path).unwrap();
        assert_png(&path);
    }

    #[test]
    fn missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("loss.png");
        let error = plot_loss_curves(&synthetic(), &path).unwrap_err();
        assert!(error.to_string().contains("loss.png"), "{error}");
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn draws_without_a_font() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let curves = Curves::from_records(&synthetic());
        write_png(&path, false, &|target, with_text| {
            render(&curves, target, with_text)
        })
        .unwrap();
        assert_png(&path);
    }

    #[test]
    fn ema_smooths_and_keeps_length() {
        assert_eq!(ema(&[1.0, 2.0, 3.0], 1.0), vec![1.0, 2.0, 3.0]);
        let constant = ema(&[2.0; 50], 10.0);
        assert_eq!(constant.len(), 50);
        assert!(constant.iter().all(|v| (v - 2.0).abs() < 1e-12));
        let smoothed = ema(&[0.0, 10.0, 0.0, 10.0, 0.0, 10.0], 5.0);
        assert_eq!(smoothed[0], 0.0);
        assert!(smoothed[1..].iter().all(|&v| v > 0.5 && v < 9.5));
        assert_eq!(smoothing_span(10), 1.0);
        assert_eq!(smoothing_span(300), 15.0);
        assert_eq!(smoothing_span(1_000_000), MAX_SMOOTHING_SPAN);
    }
}
