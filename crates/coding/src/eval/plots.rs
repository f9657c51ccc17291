//! The report's plots, one of each per code kind: precision, recall and F1 of the top k of
//! the rankings against k (1…[`MAX_K`]), and F1 per chapter as bars. Written through
//! [`medcoder_train::write_plot`], which registers a system font for the text (the plots keep
//! their lines and bars without one) and replaces each file atomically.

use std::path::Path;

use medcoder_train::{write_plot, FONT_FAMILY};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use super::{EvalReport, KindReport, Prf, MAX_K};
use crate::{CodeKind, CodingError};

/// Size of each PNG in pixels.
const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// Height of one chapter's bar (the chart grows with the number of chapters).
const BAR_HEIGHT: u32 = 26;

const PRECISION_COLOR: RGBColor = RGBColor(31, 119, 180);
const RECALL_COLOR: RGBColor = RGBColor(255, 127, 14);
const F1_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Which plot a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Plot {
    /// Micro precision, recall and F1 of the top k of each ranking, against k.
    TopK,
    /// Micro F1 of the assigned codes per chapter (CM) or section (PCS).
    ChapterF1,
}

impl Plot {
    pub fn title(self, kind: CodeKind) -> String {
        match self {
            Self::TopK => format!("{}: precision, recall and F1 of the top k", kind.as_str()),
            Self::ChapterF1 => format!("{}: F1 per chapter", kind.as_str()),
        }
    }
}

/// A plot written into the report folder.
#[derive(Debug, Clone, Serialize)]
pub struct PlotFile {
    pub kind: CodeKind,
    pub plot: Plot,
    /// The file name, relative to the report folder.
    pub file: String,
}

/// Writes every plot of `report` into `dir`; returns what it wrote. A kind without chapters
/// (no gold or assigned codes) has no chapter plot.
pub(super) fn write_plots(dir: &Path, report: &EvalReport) -> Result<Vec<PlotFile>, CodingError> {
    let mut written = Vec::new();
    for kind in &report.kinds {
        let mut plots = vec![Plot::TopK];
        if !kind.chapters.is_empty() {
            plots.push(Plot::ChapterF1);
        }
        for plot in plots {
            let file = match plot {
                Plot::TopK => format!("top_k_{}.png", kind.kind.as_str()),
                Plot::ChapterF1 => format!("chapter_f1_{}.png", kind.kind.as_str()),
            };
            write_plot(&dir.join(&file), |target, with_text| match plot {
                Plot::TopK => draw_top_k(kind, target, with_text),
                Plot::ChapterF1 => draw_chapter_f1(kind, target, with_text),
            })?;
            written.push(PlotFile {
                kind: kind.kind,
                plot,
                file,
            });
        }
    }
    Ok(written)
}

/// One of a [`Prf`]'s scores.
type PrfValue = fn(&Prf) -> f64;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// P, R and F1 of the top k against k, at the full-code level.
fn draw_top_k(report: &KindReport, target: &Path, with_text: bool) -> Result<(), String> {
    let root = BitMapBackend::new(target, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_k = MAX_K as i32;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(Plot::TopK.title(report.kind), (FONT_FAMILY, 22))
            .x_label_area_size(45)
            .y_label_area_size(55);
    }
    let mut chart = builder
        .build_cartesian_2d(1..max_k, 0f64..1.0)
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("k (codes taken from the top of each ranking)")
            .y_desc("micro score")
            .axis_desc_style((FONT_FAMILY, 15))
            .label_style((FONT_FAMILY, 13));
    } else {
        mesh.disable_axes();
    }
    mesh.draw().map_err(err)?;
    if !with_text {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(1, 1.0), (1, 0.0), (max_k, 0.0)],
                BLACK.stroke_width(1),
            )))
            .map_err(err)?;
    }
    let curves: [(&str, RGBColor, PrfValue); 3] = [
        ("precision", PRECISION_COLOR, |p| p.precision),
        ("recall", RECALL_COLOR, |p| p.recall),
        ("F1", F1_COLOR, |p| p.f1),
    ];
    for (name, color, value) in curves {
        let style = color.stroke_width(2);
        let points = report
            .code
            .at_k
            .iter()
            .map(|(k, prf)| (i32::try_from(*k).unwrap_or(max_k), value(prf)));
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// One horizontal bar per chapter, in chapter order from the top, labelled with its gold count.
fn draw_chapter_f1(report: &KindReport, target: &Path, with_text: bool) -> Result<(), String> {
    let chapters = &report.chapters;
    let n = i32::try_from(chapters.len()).map_err(err)?;
    let height = (HEIGHT / 2).max(120 + BAR_HEIGHT * chapters.len() as u32);
    let root = BitMapBackend::new(target, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    // Bar `i` from the bottom holds chapter `n - 1 - i`, so the first chapter is on top.
    let chapter_at = |i: i32| {
        usize::try_from(n - 1 - i)
            .ok()
            .and_then(|index| chapters.get(index))
    };
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(Plot::ChapterF1.title(report.kind), (FONT_FAMILY, 22))
            .x_label_area_size(40)
            .y_label_area_size(260);
    }
    // `a..b` of integers has b - a + 1 segments; one chapter gets two (plotters cannot map a
    // range of one value).
    let last_segment = if n > 1 { n - 1 } else { 1 };
    let mut chart = builder
        .build_cartesian_2d(0f64..1.1, (0..last_segment).into_segmented())
        .map_err(err)?;
    let label = |value: &SegmentValue<i32>| match value {
        SegmentValue::CenterOf(i) => chapter_at(*i)
            .map(|c| format!("{} (gold {})", c.chapter, c.gold))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_y_mesh().y_labels(chapters.len() + 1);
    if with_text {
        mesh.x_desc("F1 of the assigned codes")
            .y_label_formatter(&label)
            .axis_desc_style((FONT_FAMILY, 15))
            .label_style((FONT_FAMILY, 13));
    } else {
        mesh.disable_axes();
    }
    mesh.draw().map_err(err)?;
    chart
        .draw_series((0..n).filter_map(|i| {
            let f1 = chapter_at(i)?.scores.f1;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (f1, SegmentValue::Exact(i + 1)),
                ],
                F1_COLOR.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            Some(bar)
        }))
        .map_err(err)?;
    if with_text {
        let style =
            TextStyle::from((FONT_FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        chart
            .draw_series((0..n).filter_map(|i| {
                let f1 = chapter_at(i)?.scores.f1;
                Some(Text::new(
                    format!("{f1:.3}"),
                    (f1 + 0.01, SegmentValue::CenterOf(i)),
                    style.clone(),
                ))
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::tests::sample_report;
    use super::*;

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.len() > 100,
            "{}: {} bytes",
            path.display(),
            bytes.len()
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    }

    #[test]
    fn every_kind_gets_a_top_k_plot_and_a_chapter_plot_when_it_has_chapters() {
        let dir = tempfile::tempdir().unwrap();
        let report = sample_report();
        let files = write_plots(dir.path(), &report).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file.as_str()).collect();
        // The sample has diagnoses only: the procedure kind has no chapters.
        assert_eq!(
            names,
            [
                "top_k_diagnosis.png",
                "chapter_f1_diagnosis.png",
                "top_k_procedure.png"
            ]
        );
        for f in &files {
            assert_png(&dir.path().join(&f.file));
        }
    }

    #[test]
    fn one_chapter_is_a_plot_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut report = sample_report();
        report.kinds[0].chapters.truncate(1);
        let path = dir.path().join("c.png");
        write_plot(&path, |target, with_text| {
            draw_chapter_f1(&report.kinds[0], target, with_text)
        })
        .unwrap();
        assert_png(&path);
    }

    #[test]
    fn plots_draw_without_a_font() {
        let dir = tempfile::tempdir().unwrap();
        let report = sample_report();
        let (top_k, chapters) = (dir.path().join("k.png"), dir.path().join("c.png"));
        draw_top_k(&report.kinds[0], &top_k, false).unwrap();
        draw_chapter_f1(&report.kinds[0], &chapters, false).unwrap();
        assert_png(&top_k);
        assert_png(&chapters);
    }
}
