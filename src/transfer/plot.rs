//! Evaluation charts as PNG: the confusion matrix, the reliability diagram (calibration), and
//! the training curve (loss and accuracy per epoch). plotters draws into a pixel buffer that `image` encodes; text is rendered with a
//! TrueType font read at run time (DejaVu Sans, Debian's `fonts-dejavu-core`, or the file named
//! by `DLPIPE_FONT`).

use super::evaluate::Evaluation;
use super::train::EpochStats;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "no TrueType font to label the charts with: install fonts-dejavu-core (apt-get install fonts-dejavu-core) \
         or set DLPIPE_FONT to a .ttf file"
    )]
    NoFont,
    #[error("{path}: {error}")]
    Draw { path: PathBuf, error: DrawError },
    #[error("{path}: {error}")]
    Write { path: PathBuf, error: ::image::ImageError },
}

/// What plotters' drawing calls on the PNG's pixel buffer fail with.
pub type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// Registers the font with plotters once per process.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        let candidates = std::env::var("DLPIPE_FONT").ok().into_iter().chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if *ok {
        Ok(())
    } else {
        Err(PlotError::NoFont)
    }
}

/// Draws with `draw` on a white `width × height` canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), DrawError>,
) -> Result<(), PlotError> {
    ensure_font()?;
    let fail = |error| PlotError::Draw { path: path.into(), error };
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw(&root).map_err(fail)?;
        root.present().map_err(fail)?;
    }
    let image = ::image::RgbImage::from_raw(width, height, pixels).expect("buffer of the right size");
    image
        .save_with_format(path, ::image::ImageFormat::Png)
        .map_err(|error| PlotError::Write { path: path.into(), error })
}

/// The confusion matrix as a heat map: rows are true classes, columns predicted ones, each
/// cell shaded by the share of its row and labelled with its count.
pub fn confusion_matrix(evaluation: &Evaluation, title: &str, path: &Path) -> Result<(), PlotError> {
    let k = evaluation.classes.len();
    let names: Vec<&str> = evaluation.classes.iter().map(|c| c.class.as_str()).collect();
    let side = (160 + 84 * k as u32).max(480);
    render(path, (side + 40, side), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(110)
            // A segmented range of 0..n has n + 1 segments.
            .build_cartesian_2d((0..k as i32 - 1).into_segmented(), (0..k as i32 - 1).into_segmented())?;
        // Row r (true class r) is drawn at y = k - 1 - r, so the first class is on top.
        let name_at = |v: &SegmentValue<i32>, flip: bool| match v {
            SegmentValue::CenterOf(i) if (0..k as i32).contains(i) => {
                let i = if flip { k as i32 - 1 - i } else { *i } as usize;
                names[i].to_string()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("predicted")
            .y_desc("true")
            .x_labels(k)
            .y_labels(k)
            .x_label_formatter(&|v| name_at(v, false))
            .y_label_formatter(&|v| name_at(v, true))
            .x_label_style(("sans-serif", 12))
            .y_label_style(("sans-serif", 13))
            .draw()?;
        for (r, row) in evaluation.confusion.iter().enumerate() {
            let total: u64 = row.iter().sum::<u64>().max(1);
            let y = (k - 1 - r) as i32;
            for (c, &count) in row.iter().enumerate() {
                let share = count as f64 / total as f64;
                let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
                let fill = RGBColor(shade, shade, 255);
                let cell = [
                    (SegmentValue::Exact(c as i32), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(c as i32 + 1), SegmentValue::Exact(y + 1)),
                ];
                chart.draw_series(std::iter::once(Rectangle::new(cell, fill.filled())))?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let style = ("sans-serif", 14).into_font().color(&ink).pos(Pos::new(HPos::Center, VPos::Center));
                let at = (SegmentValue::CenterOf(c as i32), SegmentValue::CenterOf(y));
                chart.draw_series(std::iter::once(Text::new(count.to_string(), at, style)))?;
            }
        }
        Ok(())
    })
}

/// The reliability diagram: per bin of confidence (the top class's probability), how often
/// the top class is right (bars) against the diagonal of a calibrated classifier; the gap
/// shaded red, the examples per bin below.
pub fn reliability_diagram(evaluation: &Evaluation, title: &str, path: &Path) -> Result<(), PlotError> {
    let calibration = &evaluation.calibration;
    let caption = format!("reliability: expected calibration error {:.3}", calibration.ece);
    render(path, (620, 720), |root| {
        let root = root.titled(&caption, ("sans-serif", 20))?;
        // The title names the classifier and data, often long paths: small, under the caption.
        let (subtitle, root) = root.split_vertically(24);
        let style = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        subtitle.draw(&Text::new(title.to_owned(), (310, 2), style))?;
        let (top, bottom) = root.split_vertically(500);
        let mut chart = ChartBuilder::on(&top)
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("confidence (the top class's probability)")
            .y_desc("accuracy")
            .light_line_style(WHITE)
            .label_style(("sans-serif", 13))
            .draw()?;
        for bin in &calibration.bins {
            let bar = [(bin.lower, 0.0), (bin.upper, bin.accuracy)];
            chart.draw_series(std::iter::once(Rectangle::new(bar, BLUE.mix(0.6).filled())))?;
            let gap = [(bin.lower, bin.accuracy), (bin.upper, bin.confidence)];
            chart.draw_series(std::iter::once(Rectangle::new(gap, RED.mix(0.3).filled())))?;
        }
        let diagonal = LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(2));
        chart
            .draw_series(diagonal)?
            .label("calibrated")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font(("sans-serif", 13))
            .draw()?;
        let most = calibration.bins.iter().map(|b| b.examples).max().unwrap_or(1).max(1);
        let mut counts = ChartBuilder::on(&bottom)
            .margin(16)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..1.0, 0.0..most as f64 * 1.1)?;
        counts
            .configure_mesh()
            .y_desc("examples")
            .y_labels(3)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 12))
            .draw()?;
        for bin in &calibration.bins {
            let bar = [(bin.lower, 0.0), (bin.upper, bin.examples as f64)];
            counts.draw_series(std::iter::once(Rectangle::new(bar, BLACK.mix(0.4).filled())))?;
        }
        Ok(())
    })
}

/// The training curve: log-loss (left) and accuracy (right) per epoch, on the training set
/// (during the epoch) and on the held-out set (after it).
pub fn training_curve(curve: &[EpochStats], title: &str, path: &Path) -> Result<(), PlotError> {
    render(path, (1100, 460), |root| {
        let root = root.titled(title, ("sans-serif", 22))?;
        let (left, right) = root.split_horizontally(550);
        let epochs = curve.len().max(2) as f64;
        type Pick = fn(&EpochStats) -> Option<f64>;
        // Losses fall and accuracies rise: their legends go where the curves are not.
        let panels: [(&DrawingArea<_, _>, &str, Pick, Pick, SeriesLabelPosition); 2] = [
            (&left, "log-loss", |s| Some(s.train_log_loss), |s| s.test_log_loss, SeriesLabelPosition::UpperRight),
            (&right, "accuracy", |s| Some(s.train_accuracy), |s| s.test_accuracy, SeriesLabelPosition::LowerRight),
        ];
        for (area, name, train, test, legend_at) in panels {
            let values: Vec<f64> = curve.iter().flat_map(|s| [train(s), test(s)]).flatten().collect();
            let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(area)
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(1.0..epochs, (lo - pad)..(hi + pad))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(name)
                .x_labels(curve.len().clamp(2, 12))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .label_style(("sans-serif", 13))
                .draw()?;
            let series: [(&str, Pick, RGBColor); 2] = [("train", train, BLUE), ("held-out", test, RED)];
            for (label, pick, color) in series {
                let points: Vec<(f64, f64)> =
                    curve.iter().filter_map(|s| pick(s).map(|v| (s.epoch as f64, v))).collect();
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(legend_at)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        Ok(())
    })
}
