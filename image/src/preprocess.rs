//! RGB8 image in, normalised CHW f32 tensor data out, as torchvision's
//! `Resize(shorter_side) → CenterCrop → ToTensor → Normalize` does it on a PIL image, which is
//! how the models were trained: the same sizes, offsets and filter, though the resize's passes
//! run in the other order (vertical first, 15% of the bytes one off PIL's); the parity test
//! checks the features (cosine ≥ 0.999 to torchvision's). In two steps: `crop` (the
//! resized, centre-cropped RGB bytes the stream carries) and `normalise` (a per-channel table,
//! which the model's device applies to a batch of crops with the same values).
//!
//! Resizing uses fast_image_resize's convolution with a bilinear filter: the same antialiased
//! separable filter as PIL's `Image.resize(BILINEAR)`, in SIMD, about 10x faster than `image`'s.
//! A model's device can do the same resize ([`Preprocess::plan`] says what it is).

use fast_image_resize::{
    images::{Image as FirImage, ImageRef},
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("invalid preprocessing: {0}")]
    Invalid(String),
    #[error("resize failed: {0}")]
    Resize(String),
    #[error("{width}x{height} image would be {resized_width}x{resized_height} after resizing, over {MAX_RESIZED_PIXELS} pixels")]
    TooLarge { width: u32, height: u32, resized_width: u32, resized_height: u32 },
}

/// The most pixels an image may have after resizing, whatever got it there: a guard behind
/// `image.max_aspect_ratio`, checked before the resized image is allocated.
pub const MAX_RESIZED_PIXELS: u64 = 16 << 20;

/// One model's input preparation: resize the shorter side, centre-crop, scale to [0, 1],
/// subtract the mean and divide by the std per channel, lay out as CHW.
#[derive(Clone, Debug)]
pub struct Preprocess {
    height: u32,
    width: u32,
    resize_shorter_side: u32,
    filter: FilterType,
    /// Per channel, the normalised value of each of the 256 byte values: (v/255 - mean)/std.
    lut: Box<[[f32; 256]; 3]>,
}

impl Preprocess {
    pub fn new(
        height: u32,
        width: u32,
        resize_shorter_side: u32,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Self, PreprocessError> {
        if height == 0 || width == 0 {
            return Err(PreprocessError::Invalid(format!("input size {width}x{height} has a zero side")));
        }
        if resize_shorter_side < height.min(width) {
            return Err(PreprocessError::Invalid(format!(
                "resize_shorter_side {resize_shorter_side} is smaller than the {width}x{height} crop"
            )));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(PreprocessError::Invalid(format!("std {s} is not a positive number")));
        }
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Ok(Preprocess { height, width, resize_shorter_side, filter: FilterType::Bilinear, lut })
    }

    /// Resample with PIL's bicubic filter (Catmull-Rom, a = -0.5) instead of bilinear.
    pub fn with_bicubic(mut self, bicubic: bool) -> Self {
        self.filter = if bicubic { FilterType::CatmullRom } else { FilterType::Bilinear };
        self
    }

    /// Number of f32 values one image occupies: 3 x height x width.
    pub fn tensor_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }

    /// (height, width) of the output.
    pub fn output_size(&self) -> (u32, u32) {
        (self.height, self.width)
    }

    /// Number of bytes of one crop: 3 x height x width, RGB interleaved (HWC).
    pub fn crop_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }

    /// The normalisation table, channel after channel: entry `256 * c + v` is byte `v` of
    /// channel `c`, normalised. A device can normalise crops with it and match [`Self::normalise`]
    /// bit for bit.
    pub fn lut(&self) -> &[f32] {
        self.lut.as_flattened()
    }

    /// Writes `image`, prepared, into `out` (length [`Self::tensor_len`]) as CHW: [`Self::crop`]
    /// then [`Self::normalise`]. `resizer` holds scratch buffers; keep one per thread and reuse it.
    pub fn run(&self, image: &RgbImage, resizer: &mut Resizer, out: &mut [f32]) -> Result<(), PreprocessError> {
        assert_eq!(out.len(), self.tensor_len(), "output slice has the wrong length");
        let mut crop = vec![0u8; self.crop_len()];
        self.crop(image, resizer, &mut crop)?;
        self.normalise(&crop, out);
        Ok(())
    }

    /// Writes `image`, resized and centre-cropped, into `out` (length [`Self::crop_len`]) as HWC
    /// RGB bytes: a quarter of the normalised f32, so the stream holds and ships these and the
    /// model's device normalises them. `resizer` holds scratch buffers; keep one per thread.
    pub fn crop(&self, image: &RgbImage, resizer: &mut Resizer, out: &mut [u8]) -> Result<(), PreprocessError> {
        assert_eq!(out.len(), self.crop_len(), "crop slice has the wrong length");
        let (w, h) = image.dimensions();
        let plan = self.plan(w, h)?;
        let resized;
        let pixels: &[u8] = if (plan.width, plan.height) == (w, h) {
            image.as_raw()
        } else {
            let src = ImageRef::new(w, h, image.as_raw(), PixelType::U8x3)
                .map_err(|e| PreprocessError::Resize(e.to_string()))?;
            let mut dst = FirImage::new(plan.width, plan.height, PixelType::U8x3);
            let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(self.filter));
            resizer.resize(&src, &mut dst, &options).map_err(|e| PreprocessError::Resize(e.to_string()))?;
            resized = dst.into_vec();
            &resized
        };
        let (left, top) = (plan.left as usize, plan.top as usize);
        let (row_len, pw) = (self.width as usize * 3, plan.width as usize);
        for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
            out_row.copy_from_slice(&pixels[((top + y) * pw + left) * 3..][..row_len]);
        }
        Ok(())
    }

    /// How a `width` x `height` image becomes a crop (what [`Self::crop`] does, for a device
    /// that does it itself), or why it cannot: a zero side, or too large once resized.
    pub fn plan(&self, width: u32, height: u32) -> Result<ResizePlan, PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::Invalid(format!("image is {width}x{height}")));
        }
        let (new_w, new_h) = resized_size(width, height, self.resize_shorter_side);
        if u64::from(new_w) * u64::from(new_h) > MAX_RESIZED_PIXELS {
            return Err(PreprocessError::TooLarge { width, height, resized_width: new_w, resized_height: new_h });
        }
        if new_w < self.width || new_h < self.height {
            return Err(PreprocessError::Invalid(format!(
                "{new_w}x{new_h} after resizing is smaller than the {}x{} crop",
                self.width, self.height
            )));
        }
        let (left, top) = (center_offset(new_w, self.width), center_offset(new_h, self.height));
        Ok(ResizePlan { width: new_w, height: new_h, left, top })
    }

    /// Whether the resize filter is PIL's bicubic (else its bilinear).
    pub fn bicubic(&self) -> bool {
        self.filter == FilterType::CatmullRom
    }

    /// Normalises a crop (HWC bytes, as [`Self::crop`] writes it) into `out` (length
    /// [`Self::tensor_len`]) as CHW f32, through the per-channel table.
    pub fn normalise(&self, crop: &[u8], out: &mut [f32]) {
        assert_eq!(crop.len(), self.crop_len(), "crop has the wrong length");
        assert_eq!(out.len(), self.tensor_len(), "output slice has the wrong length");
        let plane = self.width as usize * self.height as usize;
        let (r_out, rest) = out.split_at_mut(plane);
        let (g_out, b_out) = rest.split_at_mut(plane);
        for (i, px) in crop.chunks_exact(3).enumerate() {
            r_out[i] = self.lut[0][px[0] as usize];
            g_out[i] = self.lut[1][px[1] as usize];
            b_out[i] = self.lut[2][px[2] as usize];
        }
    }
}

/// How one image becomes a crop: resized to `width` x `height`, then the model's input size cut
/// out at (`left`, `top`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizePlan {
    pub width: u32,
    pub height: u32,
    pub left: u32,
    pub top: u32,
}

/// torchvision's `Resize(size: int)`: the shorter side becomes `size`, the longer side keeps the
/// aspect ratio, truncated (`int(size * long / short)`).
fn resized_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // Saturates rather than wraps: the caller refuses sizes this large.
    let new_long = (u64::from(size) * u64::from(long) / u64::from(short)).min(u64::from(u32::MAX)) as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((size - crop) / 2))`, with Python's
/// round-half-to-even.
fn center_offset(size: u32, crop: u32) -> u32 {
    let diff = size - crop;
    let half = diff / 2;
    if diff.is_multiple_of(2) || half.is_multiple_of(2) {
        half
    } else {
        half + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn sizes_follow_torchvision() {
        assert_eq!(resized_size(451, 300, 256), (384, 256)); // chelsea: int(256*451/300) = 384
        assert_eq!(resized_size(300, 451, 256), (256, 384));
        assert_eq!(resized_size(28, 28, 256), (256, 256));
        assert_eq!(center_offset(256, 224), 16);
        assert_eq!(center_offset(225, 224), 0); // round(0.5) = 0
        assert_eq!(center_offset(227, 224), 2); // round(1.5) = 2
        assert_eq!(center_offset(229, 224), 2); // round(2.5) = 2
        let pre = Preprocess::new(224, 224, 256, [0.5; 3], [0.5; 3]).unwrap();
        assert_eq!(pre.plan(451, 300).unwrap(), ResizePlan { width: 384, height: 256, left: 80, top: 16 });
        assert!(matches!(pre.plan(0, 300), Err(PreprocessError::Invalid(_))));
        assert!(matches!(pre.plan(1, 100_000), Err(PreprocessError::TooLarge { .. })));
    }

    #[test]
    fn normalises_into_chw_planes() {
        let pre = Preprocess::new(2, 2, 2, [0.5; 3], [0.5; 3]).unwrap();
        let image = RgbImage::from_fn(2, 2, |x, y| if (x, y) == (1, 0) { Rgb([255, 0, 51]) } else { Rgb([0, 0, 0]) });
        let mut out = vec![0.0; pre.tensor_len()];
        pre.run(&image, &mut Resizer::new(), &mut out).unwrap();
        // Plane R, row 0: [(0-0.5)/0.5, (1-0.5)/0.5]; plane B at (1,0): (0.2-0.5)/0.5.
        assert_eq!(&out[0..2], &[-1.0, 1.0]);
        assert!((out[8 + 1] - (-0.6)).abs() < 1e-6, "{}", out[9]);
    }

    #[test]
    fn crops_the_centre_as_hwc_bytes() {
        // 4x4 stays 4x4 (shorter side 4), the 2x2 crop starts at (1, 1).
        let pre = Preprocess::new(2, 2, 4, [0.5; 3], [0.5; 3]).unwrap();
        let image = RgbImage::from_fn(4, 4, |x, y| Rgb([x as u8 * 10 + y as u8, 100 + x as u8, 200 + y as u8]));
        let mut crop = vec![0u8; pre.crop_len()];
        pre.crop(&image, &mut Resizer::new(), &mut crop).unwrap();
        assert_eq!(crop, [11, 101, 201, 21, 102, 201, 12, 101, 202, 22, 102, 202]);
        let mut normalised = vec![0.0; pre.tensor_len()];
        pre.normalise(&crop, &mut normalised);
        let mut run = vec![0.0; pre.tensor_len()];
        pre.run(&image, &mut Resizer::new(), &mut run).unwrap();
        assert_eq!(normalised, run);
        // CHW: the G plane's first value is the first pixel's green byte, through channel 1's table.
        assert_eq!(normalised[4], pre.lut()[256 + 101]);
    }

    #[test]
    fn resizes_a_uniform_image_to_the_same_colour() {
        let pre = Preprocess::new(224, 224, 256, [0.0; 3], [1.0; 3]).unwrap();
        let image = RgbImage::from_pixel(640, 480, Rgb([255, 128, 0]));
        let mut out = vec![0.0; pre.tensor_len()];
        pre.run(&image, &mut Resizer::new(), &mut out).unwrap();
        let plane = 224 * 224;
        assert!(out[..plane].iter().all(|v| (*v - 1.0).abs() < 1e-6));
        assert!(out[plane..2 * plane].iter().all(|v| (*v - 128.0 / 255.0).abs() < 1e-6));
        assert!(out[2 * plane..].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(Preprocess::new(224, 224, 200, [0.0; 3], [1.0; 3]).is_err());
        assert!(Preprocess::new(224, 224, 256, [0.0; 3], [0.0, 1.0, 1.0]).is_err());
    }
}
