//! SVG pictures drawn the way a viewer draws them (resvg), to check that a
//! chart renders, not only that its file exists.

#![allow(dead_code)]
use resvg::{tiny_skia, usvg};

/// A rendered picture, and whether its text could be drawn with a font.
pub struct Rendered {
    pub pixmap: tiny_skia::Pixmap,
    pub fonts: bool,
}

/// The system's fonts, with `sans-serif` mapped to an installed sans family:
/// fontdb's defaults name fonts (Arial, Times New Roman) a Linux machine
/// seldom has, and usvg drops text it cannot find a face for.
fn system_fonts() -> usvg::fontdb::Database {
    let mut db = usvg::fontdb::Database::new();
    db.load_system_fonts();
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    let sans = families
        .iter()
        .find(|n| n.contains("Sans") && !n.contains("Mono"))
        .or(families.first());
    if let Some(sans) = sans.cloned() {
        db.set_sans_serif_family(sans.clone());
        db.set_serif_family(sans);
    }
    db
}

/// Render `svg` at its own size; with `fonts` false, with no font at all
/// (text is then left out), to tell glyphs from the rest.
pub fn render_with(svg: &str, fonts: bool) -> Rendered {
    let mut opt = usvg::Options::default();
    let db = if fonts {
        system_fonts()
    } else {
        usvg::fontdb::Database::new()
    };
    let have_fonts = !db.is_empty();
    *opt.fontdb_mut() = db;
    let tree = usvg::Tree::from_str(svg, &opt).expect("the SVG parses");
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).expect("a non-empty size");
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    Rendered {
        pixmap,
        fonts: have_fonts,
    }
}

/// The text of every `<text>` element, unescaped enough for plain names.
pub fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            Some(
                t.split_once('>')?
                    .1
                    .split_once("</text>")?
                    .0
                    .trim()
                    .to_string(),
            )
        })
        .collect()
}

/// Render `svg` with the system's fonts.
pub fn render(svg: &str) -> Rendered {
    render_with(svg, true)
}

/// Pixels that are neither white nor transparent.
pub fn inked(pixmap: &tiny_skia::Pixmap) -> usize {
    pixmap
        .pixels()
        .iter()
        .filter(|p| p.alpha() > 0 && (p.red() < 250 || p.green() < 250 || p.blue() < 250))
        .count()
}

/// Pixels within a small distance of an RGB colour (antialiased edges aside).
pub fn pixels_of(pixmap: &tiny_skia::Pixmap, rgb: (u8, u8, u8)) -> usize {
    pixmap
        .pixels()
        .iter()
        .filter(|p| {
            let c = p.demultiply();
            c.alpha() == 255
                && c.red().abs_diff(rgb.0) <= 8
                && c.green().abs_diff(rgb.1) <= 8
                && c.blue().abs_diff(rgb.2) <= 8
        })
        .count()
}

/// Pixels where two pictures of one size differ.
pub fn differing(a: &tiny_skia::Pixmap, b: &tiny_skia::Pixmap) -> usize {
    a.pixels()
        .iter()
        .zip(b.pixels())
        .filter(|(x, y)| x != y)
        .count()
}
