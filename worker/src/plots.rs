//! PNG figures with `plotters`: the confusion matrix of an evaluation and the training curves (loss terms and
//! validation macro F1 by step). Text is drawn with DejaVu Sans (Debian's `fonts-dejavu-core`, installed by
//! scripts/setup; `AVEXPR_FONT` points elsewhere).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use avexpr_data::Expression;
use avexpr_data::metric::Confusion;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::metrics::StepMetrics;

const FONT_PATHS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"];

/// Registers the font once for the process.
fn font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = std::env::var("AVEXPR_FONT")
                .ok()
                .or_else(|| FONT_PATHS.iter().find(|p| Path::new(p).is_file()).map(|p| p.to_string()));
            let path =
                path.ok_or("no TrueType font: install fonts-dejavu-core (scripts/setup does) or set AVEXPR_FONT")?;
            let bytes: &'static [u8] =
                Box::leak(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path}: not a TrueType font"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The row-normalised confusion matrix (colour: share of the true class; text: counts).
/// Pixels (width, height) of [`confusion_png`]'s image.
pub const CONFUSION_PNG_SIZE: (u32, u32) = (900, 820);

pub fn confusion_png(path: &Path, confusion: &Confusion, title: &str) -> Result<()> {
    font()?;
    let root = BitMapBackend::new(path, CONFUSION_PNG_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let n = avexpr_data::NUM_CLASSES as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(110)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())?;
    let name = |i: i32| Expression::ALL.get(i as usize).map_or(String::new(), |e| e.name().to_string());
    // Row 0 (Neutral) at the top: y = n - 1 - true class.
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n as usize)
        .y_labels(n as usize)
        .x_label_formatter(&|v| if let SegmentValue::CenterOf(i) = v { name(*i) } else { String::new() })
        .y_label_formatter(&|v| if let SegmentValue::CenterOf(i) = v { name(n - 1 - *i) } else { String::new() })
        .x_desc("predicted")
        .y_desc("true")
        .label_style(("sans-serif", 14))
        .draw()?;
    let counts = &confusion.counts;
    let cells = (0..n).flat_map(|t| (0..n).map(move |p| (t, p)));
    chart.draw_series(cells.clone().map(|(t, p)| {
        let row: u64 = counts[t as usize].iter().sum();
        let share = if row > 0 { counts[t as usize][p as usize] as f64 / row as f64 } else { 0.0 };
        let shade = (255.0 * (1.0 - share)) as u8;
        let y = n - 1 - t;
        let corner = |a: i32, b: i32| (SegmentValue::Exact(a), SegmentValue::Exact(b));
        Rectangle::new([corner(p, y), corner(p + 1, y + 1)], RGBColor(shade, shade, 255).filled())
    }))?;
    let centred = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
    chart.draw_series(cells.map(|(t, p)| {
        let count = counts[t as usize][p as usize];
        let at = (SegmentValue::CenterOf(p), SegmentValue::CenterOf(n - 1 - t));
        Text::new(count.to_string(), at, centred.clone())
    }))?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A curve: its legend, colour and value.
type Series = (&'static str, RGBColor, fn(&StepMetrics) -> f64);

/// Training loss (total and its terms) and validation macro F1 by step.
pub fn curves_png(path: &Path, history: &[StepMetrics]) -> Result<()> {
    font()?;
    anyhow::ensure!(!history.is_empty(), "no metrics to plot");
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(420);
    let last = history.last().map_or(1, |m| m.step).max(1);
    let max_loss = history.iter().map(|m| m.loss).fold(0.0, f64::max).max(1e-6) * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .caption("training loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0..last, 0.0..max_loss)?;
    chart.configure_mesh().x_desc("step").label_style(("sans-serif", 13)).draw()?;
    let series: [Series; 3] = [
        ("total", BLUE, |m| m.loss),
        ("classification", RED, |m| m.classification),
        ("prompt contrastive", GREEN, |m| m.contrastive),
    ];
    for (label, color, value) in series {
        chart
            .draw_series(LineSeries::new(history.iter().map(|m| (m.step, value(m))), color))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption("validation macro F1", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0..last, 0.0..1.0)?;
    chart.configure_mesh().x_desc("step").label_style(("sans-serif", 13)).draw()?;
    let f1: Vec<(u64, f64)> = history.iter().filter_map(|m| Some((m.step, m.val_macro_f1?))).collect();
    chart.draw_series(LineSeries::new(f1.iter().copied(), BLACK))?;
    chart.draw_series(f1.iter().map(|&p| Circle::new(p, 4, BLACK.filled())))?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
