//! A job's per-epoch record as CSV, and the PNG of its training curves.
//!
//! The PNG is drawn here pixel by pixel with an embedded 8×8 bitmap font (`font8x8`), so it
//! renders the same on a machine without any system font: two panels, training loss per epoch
//! and validation Dice (TC, WT, ET, mean) on [0, 1], each with axes, ticks, a legend and a grid.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One epoch of a job.
///
/// Non-finite numbers serialise as the strings `"NaN"`, `"inf"`, `"-inf"` (JSON has no NaN and
/// serde_json would write `null`, which then fails to load): a diverged epoch's loss must not
/// make a checkpoint unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// Epoch number (as the job counts them).
    pub epoch: u32,
    /// Mean training loss over the epoch's steps.
    #[serde(with = "any_f64")]
    pub train_loss: f64,
    /// Learning rate the epoch ran with.
    #[serde(with = "any_f64")]
    pub learning_rate: f64,
    /// Validation Dice TC, WT, ET and their mean; `None` when the epoch was not validated.
    #[serde(with = "any_dice")]
    pub dice: Option<[f64; 4]>,
    /// Wall-clock seconds of the epoch.
    #[serde(with = "any_f64")]
    pub seconds: f64,
}

/// An f64 as a number when finite, else as its Rust spelling; reads numbers, those strings
/// and `null` (as NaN, what older files hold).
mod any_f64 {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    /// How an f64 may appear.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Repr {
        Num(f64),
        Text(String),
    }

    impl Repr {
        pub(super) fn value<E: Error>(r: Option<Repr>) -> Result<f64, E> {
            match r {
                None => Ok(f64::NAN),
                Some(Repr::Num(v)) => Ok(v),
                Some(Repr::Text(t)) => t.parse().map_err(|_| E::custom(format!("'{t}' is not a number"))),
            }
        }
    }

    pub(super) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { s.serialize_f64(*v) } else { s.collect_str(v) }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Repr::value(Option::<Repr>::deserialize(d)?)
    }
}

/// [`any_f64`] for the optional Dice quadruple.
mod any_dice {
    use super::any_f64::Repr;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises one element through `any_f64`.
    struct Elem(f64);

    impl serde::Serialize for Elem {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::any_f64::serialize(&self.0, s)
        }
    }

    pub(super) fn serialize<S: Serializer>(v: &Option<[f64; 4]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(d) => {
                let mut seq = s.serialize_seq(Some(4))?;
                for x in d {
                    seq.serialize_element(&Elem(*x))?;
                }
                seq.end()
            }
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[f64; 4]>, D::Error> {
        let Some(items) = Option::<[Option<Repr>; 4]>::deserialize(d)? else { return Ok(None) };
        let mut out = [0.0; 4];
        for (o, r) in out.iter_mut().zip(items) {
            *o = Repr::value(r)?;
        }
        Ok(Some(out))
    }
}

/// The CSV header, in column order.
pub const CSV_HEADER: &str = "epoch,loss,lr,dice_tc,dice_wt,dice_et,dice_mean,seconds";

/// Errors writing or reading the metrics files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A metrics CSV line could not be parsed.
    #[error("metrics CSV line {line}: {reason}")]
    Csv {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// PNG encoding failed.
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
}

/// Result alias of this module.
pub type Result<T, E = PlotError> = std::result::Result<T, E>;

/// The rows as CSV text: [`CSV_HEADER`], then one line per row; Dice cells are empty for
/// epochs that were not validated. Numbers use Rust's shortest round-trip form, so reading the
/// text back gives the same values (NaN as `NaN`).
pub fn metrics_csv(rows: &[EpochRow]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let dice = match r.dice {
            Some(d) => format!("{},{},{},{}", d[0], d[1], d[2], d[3]),
            None => ",,,".to_string(),
        };
        out.push_str(&format!("{},{},{},{},{}\n", r.epoch, r.train_loss, r.learning_rate, dice, r.seconds));
    }
    out
}

/// Parses text written by [`metrics_csv`] (a trailing newline and `\r\n` line ends are fine).
pub fn parse_metrics_csv(text: &str) -> Result<Vec<EpochRow>> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim() == CSV_HEADER => {}
        other => {
            return Err(PlotError::Csv {
                line: 1,
                reason: format!("header is {:?}, expected {CSV_HEADER:?}", other.map(|(_, h)| h).unwrap_or("")),
            });
        }
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| PlotError::Csv { line: line_no, reason };
        let cells: Vec<&str> = line.trim_end_matches('\r').split(',').map(str::trim).collect();
        if cells.len() != 8 {
            return Err(bad(format!("{} cells, expected 8 ({CSV_HEADER})", cells.len())));
        }
        let num =
            |k: usize| cells[k].parse::<f64>().map_err(|_| bad(format!("column {k}: '{}' is not a number", cells[k])));
        let epoch = cells[0].parse::<u32>().map_err(|_| bad(format!("epoch '{}' is not an integer", cells[0])))?;
        let dice = match cells[3..7].iter().filter(|c| c.is_empty()).count() {
            4 => None,
            0 => Some([num(3)?, num(4)?, num(5)?, num(6)?]),
            _ => return Err(bad("the four Dice cells must all be filled or all empty".into())),
        };
        rows.push(EpochRow { epoch, train_loss: num(1)?, learning_rate: num(2)?, dice, seconds: num(7)? });
    }
    Ok(rows)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| PlotError::Io { path: path.to_path_buf(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Writes [`metrics_csv`] to `path` atomically.
pub fn write_metrics_csv(path: &Path, rows: &[EpochRow]) -> Result<()> {
    write_atomic(path, metrics_csv(rows).as_bytes())
}

/// Reads a file written by [`write_metrics_csv`].
pub fn read_metrics_csv(path: &Path) -> Result<Vec<EpochRow>> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })?;
    parse_metrics_csv(&text)
}

/// Writes [`plot_png`] to `path` atomically.
pub fn write_plot_png(path: &Path, rows: &[EpochRow], title: &str) -> Result<()> {
    write_atomic(path, &plot_png(rows, title)?)
}

/// Image size.
pub const WIDTH: usize = 900;
/// Image size.
pub const HEIGHT: usize = 500;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const TEXT: Rgb = [30, 30, 30];
const AXIS: Rgb = [60, 60, 60];
const GRID: Rgb = [225, 225, 225];
/// Series colours (matplotlib's tab10, so they read as distinct for most colour vision).
const LOSS: Rgb = [255, 127, 14];
const TC: Rgb = [214, 39, 40];
const WT: Rgb = [44, 160, 44];
const ET: Rgb = [31, 119, 180];
const MEAN: Rgb = [148, 103, 189];
const DICE_SERIES: [(&str, Rgb); 4] = [("TC", TC), ("WT", WT), ("ET", ET), ("mean", MEAN)];

/// An RGB raster with clipped drawing primitives.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn fill(&mut self, x0: i64, y0: i64, w: i64, h: i64, c: Rgb) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.set(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham, stamping a square), limited to `clip`.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), width: i64, c: Rgb, clip: &Rect) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let off = (width - 1) / 2;
        loop {
            for py in y - off..y - off + width {
                for px in x - off..x - off + width {
                    if clip.contains(px, py) {
                        self.set(px, py, c);
                    }
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at `scale`× the 8×8 font, top-left at (x, y); `bold` strikes it twice.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, bold: bool, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = glyph(ch);
            let gx = x + i as i64 * 8 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let (px, py) = (gx + col * scale, y + row as i64 * scale);
                        self.fill(px, py, scale + bold as i64, scale, c);
                    }
                }
            }
        }
    }

    /// Text read bottom to top (rotated 90° anticlockwise), its baseline column at x and its
    /// first character ending at y.
    fn text_up(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let top = y - 8 * (i as i64 + 1);
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + row as i64, top + 7 - col, c);
                    }
                }
            }
        }
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.px)?;
        writer.finish()?;
        Ok(out)
    }
}

/// The font's bitmap of `c` (bit 0 is the leftmost pixel). The font is ASCII: typographic
/// punctuation that titles often carry maps to its ASCII look-alike, anything else to `?`.
fn glyph(c: char) -> [u8; 8] {
    let c = match c {
        '\u{2010}'..='\u{2015}' | '\u{2212}' => '-',
        '\u{2018}' | '\u{2019}' => '\'',
        '\u{201c}' | '\u{201d}' => '"',
        '\u{00d7}' => 'x',
        '\u{00b7}' | '\u{2022}' | '\u{2026}' => '.',
        c => c,
    };
    let i = if c.is_ascii() && !c.is_ascii_control() { c as usize } else { '?' as usize };
    font8x8::legacy::BASIC_LEGACY[i]
}

/// Pixel width of `s` at `scale`.
fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

/// A pixel rectangle, right and bottom edges exclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// The data rectangles of the loss and Dice panels.
fn plot_areas() -> [Rect; 2] {
    let half = WIDTH as i64 / 2;
    [0, half].map(|left| Rect { x0: left + 70, y0: 70, x1: left + half - 20, y1: HEIGHT as i64 - 50 })
}

/// Up to about `target` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi], and
/// the decimals their labels need.
fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    ((first..=last).map(|k| k as f64 * step).collect(), decimals)
}

/// A linear map from data to pixels over `area`.
struct Axes {
    area: Rect,
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        let w = (self.area.x1 - 1 - self.area.x0) as f64;
        let h = (self.area.y1 - 1 - self.area.y0) as f64;
        (self.area.x0 + (fx * w).round() as i64, self.area.y1 - 1 - (fy * h).round() as i64)
    }

    /// Grid, axes, ticks and tick labels, the panel title above the area and the y label.
    fn frame(&self, c: &mut Canvas, title: &str, y_label: &str) {
        let a = self.area;
        let (yt, yd) = ticks(self.y.0, self.y.1, 5);
        for &v in &yt {
            let (_, py) = self.px(self.x.0, v);
            c.fill(a.x0, py, a.x1 - a.x0, 1, GRID);
            c.fill(a.x0 - 5, py, 5, 1, AXIS);
            let label = format!("{v:.yd$}");
            c.text(a.x0 - 8 - text_width(&label, 1), py - 3, &label, 1, false, TEXT);
        }
        let (xt, _) = ticks(self.x.0, self.x.1, 8);
        for &v in xt.iter().filter(|v| v.fract() == 0.0) {
            let (px, _) = self.px(v, self.y.0);
            c.fill(px, a.y1, 1, 5, AXIS);
            let label = format!("{v:.0}");
            c.text(px - text_width(&label, 1) / 2, a.y1 + 9, &label, 1, false, TEXT);
        }
        c.fill(a.x0 - 1, a.y0, 1, a.y1 - a.y0 + 1, AXIS);
        c.fill(a.x0 - 1, a.y1, a.x1 - a.x0 + 1, 1, AXIS);
        c.text(a.x0, a.y0 - 22, title, 1, true, TEXT);
        c.text((a.x0 + a.x1) / 2 - text_width("epoch", 1) / 2, a.y1 + 26, "epoch", 1, false, TEXT);
        c.text_up(a.x0 - 62, (a.y0 + a.y1) / 2 + text_width(y_label, 1) / 2, y_label, TEXT);
    }

    /// A legend in one row, right-aligned above the area.
    fn legend(&self, c: &mut Canvas, entries: &[(&str, Rgb)]) {
        let width: i64 = entries.iter().map(|(s, _)| 18 + text_width(s, 1) + 12).sum::<i64>() - 12;
        let mut x = self.area.x1 - width;
        let y = self.area.y0 - 20;
        for (label, colour) in entries {
            c.fill(x, y + 2, 14, 3, *colour);
            c.text(x + 18, y, label, 1, false, TEXT);
            x += 18 + text_width(label, 1) + 12;
        }
    }

    /// A series as lines through its points, broken where a value is not finite (a missing
    /// value should look missing, not interpolated). Points get a marker while there are few
    /// enough to tell apart, and always when isolated, so a single epoch still shows.
    fn series(&self, c: &mut Canvas, points: &[(f64, f64)], colour: Rgb, width: i64) {
        let runs: Vec<Vec<(i64, i64)>> = points
            .split(|(x, y)| !(x.is_finite() && y.is_finite()))
            .filter(|run| !run.is_empty())
            .map(|run| run.iter().map(|&(x, y)| self.px(x, y)).collect())
            .collect();
        let few = runs.iter().map(Vec::len).sum::<usize>() <= MAX_MARKED_POINTS;
        for run in &runs {
            for pair in run.windows(2) {
                c.line(pair[0], pair[1], width, colour, &self.area);
            }
            if few || run.len() == 1 {
                for &(x, y) in run {
                    for (px, py) in (x - 2..=x + 2).flat_map(|px| (y - 2..=y + 2).map(move |py| (px, py))) {
                        if self.area.contains(px, py) {
                            c.set(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

/// Above this many points, markers (5 px) would merge into a thick line.
const MAX_MARKED_POINTS: usize = 60;

/// The epoch range to show: the rows' epochs, widened to at least 2 so one epoch is centred.
fn epoch_range(rows: &[EpochRow]) -> (f64, f64) {
    let lo = rows.iter().map(|r| r.epoch).min().unwrap_or(0) as f64;
    let hi = rows.iter().map(|r| r.epoch).max().unwrap_or(1) as f64;
    if hi - lo < 2.0 { ((lo + hi) / 2.0 - 1.0, (lo + hi) / 2.0 + 1.0) } else { (lo, hi) }
}

/// The loss axis: the finite losses with 5 % headroom, [0, 1] when there are none.
fn loss_range(rows: &[EpochRow]) -> (f64, f64) {
    let finite = rows.iter().map(|r| r.train_loss).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.1 };
    (lo - pad, hi + pad)
}

/// The training-curve PNG (900×500, RGB) of `rows`, titled `title`.
pub fn plot_png(rows: &[EpochRow], title: &str) -> Result<Vec<u8>> {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    c.fill(0, 0, WIDTH as i64, HEIGHT as i64, WHITE);
    // The title at twice the font size, shortened to fit.
    let max_chars = (WIDTH as i64 - 20) / 16;
    let title: String = title.chars().take(max_chars as usize).collect();
    c.text(WIDTH as i64 / 2 - text_width(&title, 2) / 2, 12, &title, 2, false, TEXT);

    let xr = epoch_range(rows);
    let [loss_area, dice_area] = plot_areas();
    let loss = Axes { area: loss_area, x: xr, y: loss_range(rows) };
    loss.frame(&mut c, "Training loss", "loss");
    loss.legend(&mut c, &[("train loss", LOSS)]);
    let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.epoch as f64, r.train_loss)).collect();
    loss.series(&mut c, &points, LOSS, 2);

    let dice = Axes { area: dice_area, x: xr, y: (0.0, 1.0) };
    dice.frame(&mut c, "Validation Dice", "Dice");
    dice.legend(&mut c, &DICE_SERIES);
    let validated: Vec<(u32, [f64; 4])> = rows.iter().filter_map(|r| r.dice.map(|d| (r.epoch, d))).collect();
    if validated.is_empty() {
        let msg = "not validated yet";
        c.text(
            (dice_area.x0 + dice_area.x1) / 2 - text_width(msg, 1) / 2,
            (dice_area.y0 + dice_area.y1) / 2,
            msg,
            1,
            false,
            AXIS,
        );
    }
    for (k, (_, colour)) in DICE_SERIES.iter().enumerate() {
        let points: Vec<(f64, f64)> = validated.iter().map(|(e, d)| (*e as f64, d[k])).collect();
        // The mean on top and thicker: it is what picks the best checkpoint.
        dice.series(&mut c, &points, *colour, if k == 3 { 3 } else { 2 });
    }
    if rows.is_empty() {
        let msg = "no epochs yet";
        c.text(
            (loss_area.x0 + loss_area.x1) / 2 - text_width(msg, 1) / 2,
            (loss_area.y0 + loss_area.y1) / 2,
            msg,
            1,
            false,
            AXIS,
        );
    }
    c.png()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u32) -> Vec<EpochRow> {
        (1..=n)
            .map(|e| {
                let t = e as f64 / n as f64;
                EpochRow {
                    epoch: e,
                    train_loss: 0.9 - 0.6 * t,
                    learning_rate: 1e-4 * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0,
                    dice: (e % 2 == 0).then(|| {
                        let d = [0.35 + 0.5 * t * t, 0.45 + 0.5 * t, 0.1 + 0.6 * t];
                        [d[0], d[1], d[2], (d[0] + d[1] + d[2]) / 3.0]
                    }),
                    seconds: 12.5 + e as f64,
                }
            })
            .collect()
    }

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn has(buf: &[u8], area: &Rect, colour: Rgb) -> bool {
        (area.y0..area.y1).any(|y| {
            (area.x0..area.x1).any(|x| {
                let i = (y as usize * WIDTH + x as usize) * 3;
                buf[i..i + 3] == colour
            })
        })
    }

    #[test]
    fn png_has_both_panels_and_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        write_plot_png(&path, &rows(30), "job 1234 - SegResNet BraTS").unwrap();
        let (w, h, buf) = decode(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        let [loss, dice] = plot_areas();
        assert!(has(&buf, &loss, LOSS));
        for (name, colour) in DICE_SERIES {
            assert!(has(&buf, &dice, colour), "{name} missing from the Dice panel");
            assert!(!has(&buf, &loss, colour), "{name} drawn in the loss panel");
        }
        // Text was drawn (title row holds text pixels).
        let title = Rect { x0: 0, y0: 10, x1: WIDTH as i64, y1: 30 };
        assert!(has(&buf, &title, TEXT));
    }

    #[test]
    fn png_handles_one_epoch_no_validation_and_nan() {
        let [loss, dice] = plot_areas();
        // One validated epoch: markers, no lines.
        let one = vec![EpochRow { epoch: 0, train_loss: 0.7, learning_rate: 1e-4, dice: Some([0.5; 4]), seconds: 3.0 }];
        let (_, _, buf) = decode(&plot_png(&one, "one").unwrap());
        assert!(has(&buf, &loss, LOSS) && has(&buf, &dice, MEAN));
        // Nothing validated: no Dice colour in the panel.
        let mut r = rows(5);
        r.iter_mut().for_each(|r| r.dice = None);
        r[2].train_loss = f64::NAN;
        r[3].train_loss = f64::INFINITY;
        let (_, _, buf) = decode(&plot_png(&r, "no validation").unwrap());
        assert!(has(&buf, &loss, LOSS));
        assert!(DICE_SERIES.iter().all(|(_, c)| !has(&buf, &dice, *c)));
        // All NaN, and no rows at all, still render.
        let nan = vec![EpochRow {
            epoch: 3,
            train_loss: f64::NAN,
            learning_rate: f64::NAN,
            dice: Some([f64::NAN; 4]),
            seconds: 0.0,
        }];
        let (w, h, _) = decode(&plot_png(&nan, "nan").unwrap());
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        decode(&plot_png(&[], "").unwrap());
    }

    #[test]
    fn csv_round_trips_with_empty_dice_cells() {
        let mut r = rows(4);
        r[1].dice = Some([f64::NAN, 0.5, 0.25, 0.375]);
        let text = metrics_csv(&r);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        assert!(lines.next().unwrap().contains(",,,,"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        write_metrics_csv(&path, &r).unwrap();
        let back = read_metrics_csv(&path).unwrap();
        assert_eq!(back.len(), 4);
        for (a, b) in r.iter().zip(&back) {
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
        assert!(parse_metrics_csv("epoch,loss\n").is_err());
        let e = parse_metrics_csv(&format!("{CSV_HEADER}\n1,0.5,1e-4,0.1,,,,2\n")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(read_metrics_csv(&dir.path().join("missing.csv")).unwrap_err().to_string().contains("missing.csv"));
    }

    /// Writes sample plots for a person to look at: run with
    /// `cargo test -p brats-train --lib report::tests::sample_pngs -- --ignored`, see /tmp.
    #[test]
    #[ignore]
    fn sample_pngs() {
        let mut r = rows(30);
        r[10].train_loss = f64::NAN;
        r[13].dice.as_mut().unwrap()[2] = f64::NAN;
        write_plot_png(Path::new("/tmp/brats-curves-30.png"), &r, "SegResNet training \u{2014} job 1234").unwrap();
        write_plot_png(Path::new("/tmp/brats-curves-300.png"), &rows(300), "300 epochs").unwrap();
        let one = vec![EpochRow { epoch: 1, train_loss: 0.7, learning_rate: 1e-4, dice: None, seconds: 3.0 }];
        write_plot_png(Path::new("/tmp/brats-curves-1.png"), &one, "one epoch").unwrap();
    }

    #[test]
    fn json_keeps_non_finite_values() {
        let rows = vec![
            EpochRow { epoch: 1, train_loss: f64::NAN, learning_rate: 1e-4, dice: None, seconds: f64::INFINITY },
            EpochRow {
                epoch: 2,
                train_loss: 0.25,
                learning_rate: 5e-5,
                dice: Some([f64::NAN, 0.5, f64::NEG_INFINITY, 0.125]),
                seconds: 3.5,
            },
        ];
        let json = serde_json::to_string(&rows).unwrap();
        assert!(json.contains(r#""train_loss":"NaN""#) && json.contains(r#""-inf""#), "{json}");
        let back: Vec<EpochRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(format!("{back:?}"), format!("{rows:?}"));
        // What serde_json writes for NaN by default reads back as NaN.
        let old = r#"{"epoch":3,"train_loss":null,"learning_rate":0.1,"dice":[0.5,null,0.5,0.5],"seconds":1}"#;
        let r: EpochRow = serde_json::from_str(old).unwrap();
        assert!(r.train_loss.is_nan() && r.dice.unwrap()[1].is_nan() && r.seconds == 1.0);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 1.0, 5), (vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0], 1));
        let (t, d) = ticks(1.0, 300.0, 8);
        assert_eq!((t.first(), t.last(), d), (Some(&50.0), Some(&300.0), 0));
    }
}
