//! Decoding and preprocessing as the stream does: any bytes give pixels within the limits, all
//! finite, or an error with its kind; never a panic, never an allocation past the limits.
#![no_main]

use dlpipe_image::{decode, ImageLimits, Preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Tight limits keep each case cheap; the checks are the same at any size.
    let limits =
        ImageLimits { max_encoded_bytes: 1 << 20, max_pixels: 4_000_000, max_side: 4_000, max_aspect_ratio: 32 };
    let Ok(image) = decode(data, &limits) else { return };
    let (w, h) = image.dimensions();
    assert!(u64::from(w) * u64::from(h) <= limits.max_pixels, "{w}x{h} passed the pixel limit");
    let preprocess = Preprocess::new(224, 224, 256, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).unwrap();
    let mut pixels = vec![0f32; preprocess.tensor_len()];
    if preprocess.run(&image, &mut fast_image_resize::Resizer::new(), &mut pixels).is_ok() {
        assert!(pixels.iter().all(|v| v.is_finite()), "non-finite pixels");
    }
});
