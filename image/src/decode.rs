//! Decoding encoded image bytes into RGB8, safely.
//!
//! JPEG (zune-jpeg), PNG, WebP, BMP, TIFF and GIF (first frame). The format is sniffed from the
//! bytes, never trusted from a file name. Limits are checked before any pixel is decoded: the
//! encoded size first, then the dimensions from the header, so a small file that claims a huge
//! image (a decompression bomb) is refused without allocating its pixels.

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// Bounds on what one input may cost. Defaults admit any real photo (a 50 MP camera frame is
/// 8688 x 5792) and refuse what would only exhaust memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// Largest encoded input accepted, in bytes. Default 32 MiB.
    pub max_encoded_bytes: u64,
    /// Largest decoded image accepted, in pixels (width x height). Default 64 Mpx.
    pub max_pixels: u64,
    /// Largest width or height accepted, in pixels. Default 20000.
    pub max_side: u32,
    /// Largest ratio of the longer side to the shorter one. Resizing the shorter side to the
    /// model's size scales the longer one by the same factor, so a tiny 20000x1 image would
    /// become 5,120,000x256 pixels (3.9 GB); real photos, panoramas included, stay far below
    /// this. Default 32.
    pub max_aspect_ratio: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_encoded_bytes: 32 << 20, max_pixels: 64_000_000, max_side: 20_000, max_aspect_ratio: 32 }
    }
}

/// Why some bytes did not become an image. Each variant names the cause; the caller adds which
/// input it was (a path, a URI, a Kafka record), since only it knows.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("input is empty (0 bytes)")]
    Empty,
    #[error("input is {bytes} bytes, over the limit of {limit} bytes (image.max_encoded_bytes)")]
    TooManyBytes { bytes: u64, limit: u64 },
    /// The message says what kind of content it is, never which bytes: an input may name any
    /// file the process can read (`file:///etc/passwd`), and the error goes to dead letters.
    #[error("not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF, GIF): {bytes} bytes of {content}")]
    UnknownFormat { bytes: u64, content: &'static str },
    #[error("{width}x{height} image exceeds the limits ({max_pixels} pixels, {max_side} per side; image.max_pixels, image.max_side)")]
    TooLarge { width: u32, height: u32, max_pixels: u64, max_side: u32 },
    #[error("{width}x{height} image is too elongated: its sides differ by more than {max}:1 (image.max_aspect_ratio), and resizing it would make it huge")]
    AspectRatio { width: u32, height: u32, max: u32 },
    #[error("{format} data is truncated: {detail}")]
    Truncated { format: &'static str, detail: &'static str },
    #[error("cannot decode {format} data: {source}")]
    Corrupt {
        format: &'static str,
        #[source]
        source: image::ImageError,
    },
}

/// Decodes `bytes` into an upright RGB8 image: EXIF orientation applied, greyscale expanded,
/// alpha dropped (as PIL's `convert("RGB")` does, which the models' reference transforms use),
/// CMYK converted, 16-bit reduced to 8.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() as u64 > limits.max_encoded_bytes {
        return Err(DecodeError::TooManyBytes { bytes: bytes.len() as u64, limit: limits.max_encoded_bytes });
    }
    let format = image::guess_format(bytes)
        .map_err(|_| DecodeError::UnknownFormat { bytes: bytes.len() as u64, content: content_kind(bytes) })?;
    let format_name = format.extensions_str().first().copied().unwrap_or("image");
    let corrupt = |source| DecodeError::Corrupt { format: format_name, source };
    if format == image::ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The decoder's own allocation cap, as a second line behind the header check below (some
    // formats allocate before they report dimensions). Width and height are checked here, not
    // by the decoder, so that the error can say what the image claims to be.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(|e| too_large_or(e, limits, corrupt))?;
    let (width, height) = decoder.dimensions();
    if width > limits.max_side || height > limits.max_side || u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(DecodeError::TooLarge { width, height, max_pixels: limits.max_pixels, max_side: limits.max_side });
    }
    let (short, long) = (width.min(height), width.max(height));
    if short == 0 || u64::from(long) > u64::from(short) * u64::from(limits.max_aspect_ratio) {
        return Err(DecodeError::AspectRatio { width, height, max: limits.max_aspect_ratio });
    }
    // A broken EXIF block is not a reason to lose the image: fall back to "as stored".
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| too_large_or(e, limits, corrupt))?;
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// zune-jpeg (rightly, for viewers) decodes a cut-off JPEG and fills the missing rows with grey;
/// a classifier would then label half an image. So: the entropy-coded data of the last scan must
/// be followed by an end-of-image marker. Inside scan data every 0xFF byte is stuffed (FF 00) or
/// a restart marker (FF D0-D7), so FF D9 after the last start-of-scan (FF DA) is the real end.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), DecodeError> {
    let truncated = |detail| Err(DecodeError::Truncated { format: "jpg", detail });
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return truncated("it has no image scan (start-of-scan marker)");
    };
    if bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        truncated("no end-of-image marker after the last scan")
    }
}

fn too_large_or(
    e: image::ImageError,
    limits: &ImageLimits,
    other: impl FnOnce(image::ImageError) -> DecodeError,
) -> DecodeError {
    match e {
        image::ImageError::Limits(_) => {
            DecodeError::TooLarge { width: 0, height: 0, max_pixels: limits.max_pixels, max_side: limits.max_side }
        }
        e => other(e),
    }
}

/// What an unrecognised input is, in words that quote none of its bytes: "text" (its first
/// bytes are UTF-8 without control characters other than whitespace) or "binary data".
fn content_kind(bytes: &[u8]) -> &'static str {
    let head = &bytes[..bytes.len().min(512)];
    // A multi-byte character cut off by the 512-byte window is still text.
    let valid = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(""),
        Err(_) => return "binary data",
    };
    if valid.chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c')) {
        "text"
    } else {
        "binary data"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbaImage};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
    }

    #[test]
    fn decodes_every_supported_format_to_rgb() {
        let rgb = DynamicImage::ImageRgb8(gradient(40, 30));
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Bmp,
            ImageFormat::Tiff,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ] {
            let bytes = encode(&rgb, format);
            let decoded = decode(&bytes, &ImageLimits::default()).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(decoded.dimensions(), (40, 30), "{format:?}");
            // Lossy formats move pixels a little; a wrong channel order or orientation moves them a lot.
            let p = decoded.get_pixel(35, 5);
            assert!(p[0] > 180 && p[1] < 70, "{format:?}: pixel (35,5) is {p:?}");
        }
    }

    #[test]
    fn greyscale_and_alpha_become_rgb() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([77])));
        let decoded = decode(&encode(&grey, ImageFormat::Png), &ImageLimits::default()).unwrap();
        assert_eq!(decoded.get_pixel(3, 3), &Rgb([77, 77, 77]));
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(8, 8, image::Rgba([10, 20, 30, 0])));
        let decoded = decode(&encode(&rgba, ImageFormat::Png), &ImageLimits::default()).unwrap();
        assert_eq!(decoded.get_pixel(0, 0), &Rgb([10, 20, 30]), "alpha is dropped, as PIL's convert('RGB') does");
    }

    #[test]
    fn refuses_empty_text_truncated_and_oversized_inputs_with_reasons() {
        let limits = ImageLimits::default();
        assert!(matches!(decode(b"", &limits), Err(DecodeError::Empty)));
        let err = decode(b"hello, I am not a picture", &limits).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownFormat { bytes: 25, content: "text" }), "{err:?}");

        let jpeg = encode(&DynamicImage::ImageRgb8(gradient(64, 64)), ImageFormat::Jpeg);
        let err = decode(&jpeg[..jpeg.len() / 2], &limits).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { format: "jpg", .. }), "{err:?}");
        // Cut inside the headers instead: no scan at all.
        assert!(decode(&jpeg[..200], &limits).is_err());

        let small = ImageLimits { max_encoded_bytes: 100, ..limits };
        assert!(matches!(decode(&jpeg, &small), Err(DecodeError::TooManyBytes { limit: 100, .. })));
        let few_pixels = ImageLimits { max_pixels: 1000, ..limits };
        let err = decode(&jpeg, &few_pixels).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 64, height: 64, .. }), "{err:?}");
    }

    #[test]
    fn an_unrecognised_input_is_described_without_quoting_its_bytes() {
        let limits = ImageLimits::default();
        let secret = "root:x:0:0:SECRET-7f3a:/root:/bin/bash\n";
        let err = decode(secret.as_bytes(), &limits).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&format!("{} bytes of text", secret.len())), "{message}");
        for quoted in ["root", "SECRET", "7f3a", "bash"] {
            assert!(!message.contains(quoted), "the message quotes the input: {message}");
        }
        // Non-ASCII text, cut by the window inside a character, is still text.
        let accents = format!("a{}", "é".repeat(600));
        assert!(decode(accents.as_bytes(), &limits).unwrap_err().to_string().contains("bytes of text"));
        let binary = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0, 0xde, 0xad, 0xbe, 0xef];
        let message = decode(&binary, &limits).unwrap_err().to_string();
        assert!(message.contains("12 bytes of binary data"), "{message}");
        assert!(!message.contains("7f") && !message.contains("ELF") && !message.contains("de ad"), "{message}");
    }

    #[test]
    fn a_png_header_claiming_a_huge_image_is_refused_before_decoding() {
        // A valid 1x1 PNG whose IHDR is rewritten to claim 100000 x 100000 pixels (CRC fixed up).
        let mut png = encode(&DynamicImage::ImageRgb8(gradient(1, 1)), ImageFormat::Png);
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&png, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { width: 100_000, height: 100_000, .. }), "{err:?}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn a_tiny_elongated_image_is_refused_before_it_is_decoded_or_resized() {
        // A 20000x1 PNG is a few hundred bytes, within max_side and max_pixels; resized to a shorter side
        // of 256 it would be 5,120,000x256 RGB: 3.9 GB. Its header alone must refuse it.
        let bomb = encode(&DynamicImage::ImageRgb8(RgbImage::new(20_000, 1)), ImageFormat::Png);
        assert!(bomb.len() < 1024, "{} bytes", bomb.len());
        let err = decode(&bomb, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::AspectRatio { width: 20_000, height: 1, max: 32 }), "{err}");
        assert_eq!(err.kind(), "too_large");
        assert!(err.to_string().contains("image.max_aspect_ratio"), "{err}");
        // A long panorama within the ratio still decodes.
        let panorama = encode(&DynamicImage::ImageRgb8(RgbImage::new(3200, 100)), ImageFormat::Png);
        assert_eq!(decode(&panorama, &ImageLimits::default()).unwrap().dimensions(), (3200, 100));
    }

    #[test]
    fn preprocessing_refuses_what_would_be_huge_after_resizing_whatever_the_limits_let_through() {
        // With the aspect-ratio limit lifted, the preprocessing's own guard still refuses the
        // image before allocating the resized copy.
        let limits = ImageLimits { max_aspect_ratio: u32::MAX, ..ImageLimits::default() };
        let image =
            decode(&encode(&DynamicImage::ImageRgb8(RgbImage::new(20_000, 1)), ImageFormat::Png), &limits).unwrap();
        let preprocess = crate::Preprocess::new(224, 224, 256, [0.5; 3], [0.5; 3]).unwrap();
        let mut out = vec![0f32; preprocess.tensor_len()];
        let err = preprocess.run(&image, &mut fast_image_resize::Resizer::new(), &mut out).unwrap_err();
        assert_eq!(err.kind(), "too_large", "{err}");
        assert!(err.to_string().contains("5120000x256"), "{err}");
    }
}
