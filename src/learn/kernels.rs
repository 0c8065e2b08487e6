//! The learner's hot loops: matrix-vector products, standardisation, the optimizers' per-weight
//! updates, softmax, and the choice of instruction set they run with.
//!
//! [`SimdPath`] picks, once at run time, between the target's baseline (SSE2 on x86-64) and
//! AVX2. The element-wise kernels are written once, as plain loops that LLVM's loop vectoriser
//! handles reliably, and compiled twice by the `kernels!` macro: as they are, and with
//! `#[target_feature(enable = "avx2")]`, which makes the same code 256-bit vector code. Each is
//! a function of its own taking its arrays as separate slice arguments: that is what tells LLVM
//! that they do not overlap (references passed as arguments are `noalias`), without which it
//! cannot vectorise a loop that stores into one array and loads from another; the same loop
//! inlined into a method that reaches the arrays through `self` stays scalar. The forward pass's
//! matrix-vector products are reductions, which LLVM may not reorder and vectorised badly here;
//! their portable versions accumulate in explicit lanes, and their AVX2 versions are written
//! with intrinsics that perform the same operations ([`avx2_rows`]).
//!
//! **Both paths compute bit-identical results**, so that workers on different CPUs that learn
//! the same examples hold the same model, and a snapshot made on one machine continues learning
//! identically on another:
//! - reductions accumulate into [`LANES`] independent partial sums, lane `l` taking elements
//!   `l, l + LANES, ...` in order, and combine the lanes in a fixed tree; any vector width that
//!   divides `LANES` performs exactly these operations;
//! - multiplies and adds are never fused: Rust does not contract `a * b + c` into an FMA, and
//!   no kernel asks for one. This is also why the fast path enables AVX2 but not FMA: an FMA
//!   rounds once where the portable code rounds twice, so its results would differ. Nor would
//!   it be faster: SGD's update is bound by the traffic to the weights, which do not fit in L1,
//!   and AdaGrad's and FTRL's by their square roots and divisions;
//! - `exp` is computed here ([`exp`]) from IEEE-exact operations rather than by the platform's
//!   libm, whose results may differ in the last bit between libm versions;
//! - division and square root are exactly rounded by IEEE 754 at every width.

use super::config::AdagradConfig;
use std::fmt;

/// Partial sums per reduction. 16 lanes are two AVX2 registers or four SSE registers per
/// accumulator, enough independent additions to hide the adder's latency.
pub(crate) const LANES: usize = 16;

/// The instruction set the learner's hot loops run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdPath {
    /// 256-bit AVX2 vectors (x86-64 CPUs that have AVX2).
    Avx2,
    /// The compilation target's baseline (SSE2 on x86-64).
    Portable,
}

impl SimdPath {
    /// The fastest path this CPU supports.
    pub fn detect() -> SimdPath {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return SimdPath::Avx2;
        }
        SimdPath::Portable
    }

    /// A short name for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Avx2 => "avx2",
            SimdPath::Portable => {
                if cfg!(target_arch = "x86_64") {
                    "sse2"
                } else {
                    "portable"
                }
            }
        }
    }
}

impl fmt::Display for SimdPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Declares kernels once and compiles each twice: `portable::NAME` for the target's baseline
/// and `avx2::NAME` for AVX2, with a dispatching method `SimdPath::NAME`. The bodies call the
/// `#[inline(always)]` helpers below, which are inlined into each version.
macro_rules! kernels {
    ($(
        $(#[doc = $doc:literal])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    )*) => {
        /// The kernels compiled for the target's baseline instruction set.
        mod portable {
            use super::*;
            $(
                // Never inlined: the arrays must stay `noalias` arguments (see the module
                // documentation).
                #[inline(never)]
                pub(super) fn $name($($arg: $ty),*) $(-> $ret)? $body
            )*
        }

        /// The kernels compiled for AVX2.
        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            use super::*;
            $(
                /// # Safety
                /// The CPU must support AVX2.
                #[inline(never)]
                #[target_feature(enable = "avx2")]
                pub(super) unsafe fn $name($($arg: $ty),*) $(-> $ret)? $body
            )*
        }

        impl SimdPath {
            $(
                $(#[doc = $doc])*
                #[inline]
                pub(crate) fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                    match self {
                        // The detection result is cached by std: one load and a branch per call.
                        #[cfg(target_arch = "x86_64")]
                        SimdPath::Avx2 if std::is_x86_feature_detected!("avx2") => {
                            // SAFETY: AVX2 was detected on this CPU just above.
                            unsafe { avx2::$name($($arg),*) }
                        }
                        _ => portable::$name($($arg),*),
                    }
                }
            )*
        }
    };
}

kernels! {
    /// Whether every element of `x` is finite. Counted without an early exit, as an integer
    /// reduction, which LLVM vectorises (a float reduction it may not reorder).
    fn all_finite(x: &[f32]) -> bool {
        x.iter().fold(0u32, |bad, v| bad | u32::from(!v.is_finite())) == 0
    }

    /// Writes `x` standardised with `stats` (`x.len()` means, then as many `m2`) and `inv_n`
    /// (`1 / count`, 0 before any observation) into `out`.
    fn standardize(x: &[f32], stats: &[f32], out: &mut [f32], inv_n: f32) {
        let (mean, m2) = stats.split_at(x.len());
        assert!(m2.len() == x.len() && out.len() == x.len(), "standardize of slices of different lengths");
        for (((out, x), mean), m2) in out.iter_mut().zip(x).zip(mean).zip(m2) {
            *out = standardize_one(*x, *mean, *m2, inv_n);
        }
    }

    /// [`standardize`](Self::standardize), and Welford's update of `stats` with `x` written to
    /// `next` (`inv_n1` being `1 / (count + 1)`), in one pass. Returns whether every element of
    /// `x` is finite (if not, `next` is garbage).
    fn standardize_observe(x: &[f32], stats: &[f32], next: &mut [f32], out: &mut [f32], inv_n: f32, inv_n1: f32) -> bool {
        let (mean, m2) = stats.split_at(x.len());
        let (next_mean, next_m2) = next.split_at_mut(x.len());
        assert!(
            m2.len() == x.len() && next_m2.len() == x.len() && out.len() == x.len(),
            "standardize_observe of slices of different lengths"
        );
        // Element-wise, with an integer reduction for the check: LLVM vectorises the loop as it
        // stands. The square root and division, once per feature, are the expensive part.
        let mut bad = 0u32;
        let next = next_mean.iter_mut().zip(next_m2);
        for ((((out, x), mean), m2), (next_mean, next_m2)) in out.iter_mut().zip(x).zip(mean).zip(m2).zip(next) {
            *out = standardize_one(*x, *mean, *m2, inv_n);
            (*next_mean, *next_m2) = observe_one(*x, *mean, *m2, inv_n1);
            bad |= u32::from(!x.is_finite());
        }
        bad == 0
    }

    /// Welford's update of `stats` with `x` written to `next` (`inv_n1` being
    /// `1 / (count + 1)`). Returns whether every element of `x` is finite.
    fn observe(x: &[f32], stats: &[f32], next: &mut [f32], inv_n1: f32) -> bool {
        let (mean, m2) = stats.split_at(x.len());
        let (next_mean, next_m2) = next.split_at_mut(x.len());
        assert!(m2.len() == x.len() && next_m2.len() == x.len(), "observe of slices of different lengths");
        let mut bad = 0u32;
        let next = next_mean.iter_mut().zip(next_m2);
        for (((x, mean), m2), (next_mean, next_m2)) in x.iter().zip(mean).zip(m2).zip(next) {
            (*next_mean, *next_m2) = observe_one(*x, *mean, *m2, inv_n1);
            bad |= u32::from(!x.is_finite());
        }
        bad == 0
    }

    /// Applies an SGD step to the weights (`steps.len() x features.len()`, row-major):
    /// `w_k = decay * w_k + steps[k] * features` (`w_k + steps[k] * features` when `decay` is 1).
    fn sgd_apply(weights: &mut [f32], features: &[f32], steps: &[f32], decay: f32) {
        assert_eq!(weights.len(), features.len() * steps.len(), "weights shape does not match the step");
        if features.is_empty() {
            return;
        }
        for (w, &a) in weights.chunks_exact_mut(features.len()).zip(steps) {
            apply_step(w, a, decay, features);
        }
    }

    /// AdaGrad on the weights, with `sum_sq` the accumulated squared gradients (both
    /// `coeffs.len() x x.len()`): see [`adagrad_coordinate`], with gradient `c_k x_i + l2 w`.
    fn adagrad_step(weights: &mut [f32], sum_sq: &mut [f32], x: &[f32], coeffs: &[f32], config: AdagradConfig) {
        let AdagradConfig { learning_rate: lr, epsilon, l2 } = config;
        assert!(
            weights.len() == x.len() * coeffs.len() && sum_sq.len() == weights.len(),
            "adagrad_step of slices of different shapes"
        );
        if x.is_empty() {
            return;
        }
        let rows = weights.chunks_exact_mut(x.len()).zip(sum_sq.chunks_exact_mut(x.len()));
        for ((w, g2), &c) in rows.zip(coeffs) {
            for ((w, g2), x) in w.iter_mut().zip(g2).zip(x) {
                let g = c * x + l2 * *w;
                adagrad_coordinate(w, g2, g, lr, epsilon);
            }
        }
    }

    /// FTRL-Proximal on the weights, with accumulators `z` and `n` (all `coeffs.len() x x.len()`):
    /// see [`ftrl_coordinate`], with gradient `c_k x_i`.
    fn ftrl_step(weights: &mut [f32], z: &mut [f32], n: &mut [f32], x: &[f32], coeffs: &[f32], params: FtrlParams) {
        assert!(
            weights.len() == x.len() * coeffs.len() && z.len() == weights.len() && n.len() == weights.len(),
            "ftrl_step of slices of different shapes"
        );
        if x.is_empty() {
            return;
        }
        let d = x.len();
        let rows = weights.chunks_exact_mut(d).zip(z.chunks_exact_mut(d)).zip(n.chunks_exact_mut(d));
        for (((w, z), n), &c) in rows.zip(coeffs) {
            for (((w, z), n), x) in w.iter_mut().zip(z).zip(n).zip(x) {
                ftrl_coordinate(w, z, n, c * x, params);
            }
        }
    }
}

/// An SGD step not yet applied to the weights: `w_k <- decay * w_k + steps[k] * features`, or
/// `w_k + steps[k] * features` when `decay` is 1 (see [`apply_step_one`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SgdStep<'a> {
    pub steps: &'a [f32],
    pub decay: f32,
    pub features: &'a [f32],
}

/// The forward pass's matrix-vector products: `out[r] = dot(matrix row r, x)` for the
/// row-major `out.len() x x.len()` matrix, each row's sum computed exactly as `dot` computes
/// it; optionally after applying a pending SGD step to the rows, in the same pass over the
/// weights. The weights of 1280 features and 10 classes (51 KB) do not fit in L1, so each pass
/// over them counts.
///
/// Written by hand rather than with `kernels!` because their AVX2 versions use intrinsics
/// (see `avx2_rows`).
impl SimdPath {
    /// `out = matrix · x`.
    pub(crate) fn matvec(self, matrix: &[f32], x: &[f32], out: &mut [f32]) {
        check_matvec(matrix.len(), x, out, None);
        match self {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 if std::is_x86_feature_detected!("avx2") => {
                // SAFETY: AVX2 was detected just above; the shapes were checked. The matrix is
                // only read (STORE is false), so casting away const is sound.
                unsafe { avx2_rows::rows::<false, false, false>(matrix.as_ptr().cast_mut(), x, None, out) }
            }
            _ => portable_rows::matvec(matrix, x, out),
        }
    }

    /// Applies `step` to `weights`, then `out = weights · x`, in one pass over the weights.
    pub(crate) fn apply_step_matvec(self, weights: &mut [f32], step: SgdStep<'_>, x: &[f32], out: &mut [f32]) {
        check_matvec(weights.len(), x, out, Some(step));
        match self {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 if std::is_x86_feature_detected!("avx2") => {
                // SAFETY: AVX2 was detected just above; the shapes were checked; the pointer
                // comes from an exclusive borrow that outlives the call.
                unsafe { avx2_rows::apply_step(weights.as_mut_ptr(), x, step, out) }
            }
            _ => portable_rows::apply_step_matvec(weights, step, x, out),
        }
    }

    /// `out = (weights after step) · x`, leaving `weights` as they are: what
    /// [`apply_step_matvec`](Self::apply_step_matvec) computes, for a shared model.
    pub(crate) fn matvec_after_step(self, weights: &[f32], step: SgdStep<'_>, x: &[f32], out: &mut [f32]) {
        check_matvec(weights.len(), x, out, Some(step));
        match self {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 if std::is_x86_feature_detected!("avx2") => {
                let w = weights.as_ptr().cast_mut();
                // SAFETY: AVX2 was detected just above; the shapes were checked. The weights
                // are only read (STORE is false), so casting away const is sound.
                unsafe {
                    if step.decay == 1.0 {
                        avx2_rows::rows::<true, false, false>(w, x, Some(step), out)
                    } else {
                        avx2_rows::rows::<true, true, false>(w, x, Some(step), out)
                    }
                };
            }
            _ => portable_rows::matvec_after_step(weights, step, x, out),
        }
    }
}

/// Panics unless the matrix is `out.len() x x.len()` (and the step, if any, fits it). The AVX2
/// kernels rely on this for the bounds of their pointer arithmetic.
fn check_matvec(matrix_len: usize, x: &[f32], out: &[f32], step: Option<SgdStep<'_>>) {
    assert_eq!(matrix_len, x.len() * out.len(), "matrix shape does not match x and out");
    if let Some(step) = step {
        assert!(
            step.steps.len() == out.len() && step.features.len() == x.len(),
            "SGD step shape does not match the matrix"
        );
    }
}

/// The baseline versions of the matrix-vector products.
mod portable_rows {
    use super::{apply_step, apply_step_one, dot, finish, SgdStep, LANES};

    #[inline(never)]
    pub(super) fn matvec(matrix: &[f32], x: &[f32], out: &mut [f32]) {
        if x.is_empty() {
            return out.fill(0.0);
        }
        for (row, o) in matrix.chunks_exact(x.len()).zip(out) {
            *o = dot(row, x);
        }
    }

    #[inline(never)]
    pub(super) fn apply_step_matvec(weights: &mut [f32], step: SgdStep<'_>, x: &[f32], out: &mut [f32]) {
        if x.is_empty() {
            return out.fill(0.0);
        }
        for ((row, o), &a) in weights.chunks_exact_mut(x.len()).zip(out).zip(step.steps) {
            apply_step(row, a, step.decay, step.features);
            *o = dot(row, x);
        }
    }

    #[inline(never)]
    pub(super) fn matvec_after_step(weights: &[f32], step: SgdStep<'_>, x: &[f32], out: &mut [f32]) {
        if x.is_empty() {
            return out.fill(0.0);
        }
        for ((row, o), &a) in weights.chunks_exact(x.len()).zip(out).zip(step.steps) {
            // `dot` of the stepped row, the stepped lanes computed on the fly.
            let mut acc = [0.0f32; LANES];
            let (wc, zc, xc) = (row.chunks_exact(LANES), step.features.chunks_exact(LANES), x.chunks_exact(LANES));
            let (w_tail, z_tail, x_tail) = (wc.remainder(), zc.remainder(), xc.remainder());
            for ((w, z), x) in wc.zip(zc).zip(xc) {
                for l in 0..LANES {
                    acc[l] += apply_step_one(w[l], a, step.decay, z[l]) * x[l];
                }
            }
            let mut rest = 0.0f32;
            for ((w, z), x) in w_tail.iter().zip(z_tail).zip(x_tail) {
                rest += apply_step_one(*w, a, step.decay, *z) * x;
            }
            *o = finish(acc, rest);
        }
    }
}

/// The AVX2 forward pass, with intrinsics that perform exactly the operations of the portable
/// code: two 8-wide accumulators are [`dot`]'s 16 lanes, the reduction follows the same tree,
/// and the step is [`apply_step_one`]'s multiply and add. Written by hand because LLVM's
/// vectorisation of the portable reductions is fragile: depending on the surrounding code it
/// vectorised across rows, or two lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx2_rows {
    use super::{apply_step_one, SgdStep, LANES};
    use std::arch::x86_64::*;

    const _: () = assert!(LANES == 16, "the accumulators below are two registers of 8 lanes");

    /// [`rows`] applying and storing `step`, with its decay or not.
    ///
    /// # Safety
    /// As [`rows`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn apply_step(w: *mut f32, x: &[f32], step: SgdStep<'_>, out: &mut [f32]) {
        if step.decay == 1.0 {
            rows::<true, false, true>(w, x, Some(step), out)
        } else {
            rows::<true, true, true>(w, x, Some(step), out)
        }
    }

    /// `out[r] = dot(row r, x)` over the `out.len() x x.len()` row-major matrix at `w`; with
    /// `APPLY`, of each row after `step` (with `DECAY` unless its decay is 1), which `STORE`
    /// writes back.
    ///
    /// # Safety
    /// The CPU must support AVX2; `w` must point to `out.len() * x.len()` floats, writable if
    /// `STORE`, overlapping none of the slices; `step` must be `Some` and match the shape if
    /// `APPLY`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows<const APPLY: bool, const DECAY: bool, const STORE: bool>(
        w: *mut f32,
        x: &[f32],
        step: Option<SgdStep<'_>>,
        out: &mut [f32],
    ) {
        let (d, k) = (x.len(), out.len());
        let (steps, decay, z): (&[f32], f32, *const f32) = match step {
            Some(s) => (s.steps, s.decay, s.features.as_ptr()),
            None => (&[], 1.0, x.as_ptr()),
        };
        let rows_step = |r: usize, n: usize| RowsStep {
            steps: std::array::from_fn(|i| if APPLY && i < n { steps[r + i] } else { 0.0 }),
            n,
            decay,
            z,
        };
        let mut r = 0;
        // Four rows at a time: each chunk of x (and of the step's features) is loaded once for
        // four rows, and the eight independent accumulators hide the adder's latency.
        while r + 4 <= k {
            block::<4, APPLY, DECAY, STORE>(w.add(r * d), x, &mut out[r..r + 4], rows_step(r, 4));
            r += 4;
        }
        // The last one to three rows together too: a lone row's two accumulators would wait on
        // the adder's latency.
        let (wr, o) = (w.add(r * d), &mut out[r..]);
        match k - r {
            0 => {}
            1 => block::<1, APPLY, DECAY, STORE>(wr, x, o, rows_step(r, 1)),
            2 => block::<2, APPLY, DECAY, STORE>(wr, x, o, rows_step(r, 2)),
            _ => block::<3, APPLY, DECAY, STORE>(wr, x, o, rows_step(r, 3)),
        }
    }

    /// The pending step's part for a block of rows.
    #[derive(Clone, Copy)]
    struct RowsStep {
        /// The first `n` are the block's rows' steps.
        steps: [f32; 4],
        n: usize,
        decay: f32,
        /// The step's features.
        z: *const f32,
    }

    /// `R` rows from `w` into `out` (`R <= 4`): see [`rows`].
    #[target_feature(enable = "avx2")]
    unsafe fn block<const R: usize, const APPLY: bool, const DECAY: bool, const STORE: bool>(
        w: *mut f32,
        x: &[f32],
        out: &mut [f32],
        step: RowsStep,
    ) {
        debug_assert!(step.n == R && out.len() == R);
        let RowsStep { steps, decay, z, .. } = step;
        let d = x.len();
        let full = d - d % LANES;
        let xp = x.as_ptr();
        let dv = _mm256_set1_ps(decay);
        let mut a = [_mm256_setzero_ps(); R];
        for k in 0..R {
            a[k] = _mm256_set1_ps(steps[k]);
        }
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i < full {
            let (xa, xb) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            let (za, zb) = if APPLY { (_mm256_loadu_ps(z.add(i)), _mm256_loadu_ps(z.add(i + 8))) } else { (xa, xb) };
            for k in 0..R {
                let row = w.add(k * d + i);
                let wa = weights8::<APPLY, DECAY, STORE>(row, a[k], dv, za);
                let wb = weights8::<APPLY, DECAY, STORE>(row.add(8), a[k], dv, zb);
                lo[k] = _mm256_add_ps(lo[k], _mm256_mul_ps(wa, xa));
                hi[k] = _mm256_add_ps(hi[k], _mm256_mul_ps(wb, xb));
            }
            i += LANES;
        }
        for k in 0..R {
            let mut rest = 0.0f32;
            for (j, xj) in x.iter().enumerate().skip(full) {
                let wj = w.add(k * d + j);
                let value = if APPLY { apply_step_one(*wj, steps[k], decay, *z.add(j)) } else { *wj };
                if STORE {
                    *wj = value;
                }
                rest += value * xj;
            }
            out[k] = reduce(lo[k], hi[k]) + rest;
        }
    }

    /// Eight weights at `w`, after the step if `APPLY` (stored back if `STORE`).
    #[inline(always)]
    unsafe fn weights8<const APPLY: bool, const DECAY: bool, const STORE: bool>(
        w: *mut f32,
        a: __m256,
        decay: __m256,
        z: __m256,
    ) -> __m256 {
        let v = _mm256_loadu_ps(w);
        if !APPLY {
            return v;
        }
        let step = _mm256_mul_ps(a, z);
        let v = if DECAY { _mm256_add_ps(_mm256_mul_ps(decay, v), step) } else { _mm256_add_ps(v, step) };
        if STORE {
            _mm256_storeu_ps(w, v);
        }
        v
    }

    /// The lanes `lo[0..8] ++ hi[0..8]` summed in the portable `reduce`'s tree.
    #[inline(always)]
    unsafe fn reduce(lo: __m256, hi: __m256) -> f32 {
        let s8 = _mm256_add_ps(lo, hi); // lane i + lane i+8
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8)); // i + i+4
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // i + i+2
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)); // 0 + 1
        _mm_cvtss_f32(s1)
    }
}

/// Sums the lanes in a fixed tree: `(a[0] + a[8]) + (a[4] + a[12]) + ...`, the same at any width.
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The dot product of `a` and `b` (equal lengths), in the lane order described in the module
/// documentation.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (ac.remainder(), bc.remainder());
    for (a, b) in ac.zip(bc) {
        let a: &[f32; LANES] = a.try_into().expect("chunks_exact yields LANES elements");
        let b: &[f32; LANES] = b.try_into().expect("chunks_exact yields LANES elements");
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    let mut rest = 0.0f32;
    for (a, b) in a_tail.iter().zip(b_tail) {
        rest += a * b;
    }
    finish(acc, rest)
}

/// The lanes' sum plus the sum of the elements past the last full chunk.
#[inline(always)]
fn finish(acc: [f32; LANES], rest: f32) -> f32 {
    reduce(acc) + rest
}

/// One weight after an SGD step: `decay * w + a * z`, or `w + a * z` when `decay` is 1 (the
/// multiply by 1 would not change the result, and costs a pass's worth of multiplies).
#[inline(always)]
pub(crate) fn apply_step_one(w: f32, a: f32, decay: f32, z: f32) -> f32 {
    if decay == 1.0 {
        w + a * z
    } else {
        decay * w + a * z
    }
}

/// Applies an SGD step to one row: `w = apply_step_one(w, a, decay, z)` element-wise. The
/// branch is hoisted so that each loop is a plain element-wise loop, which LLVM vectorises.
#[inline(always)]
fn apply_step(w: &mut [f32], a: f32, decay: f32, z: &[f32]) {
    assert_eq!(w.len(), z.len(), "apply_step of slices of different lengths");
    if decay == 1.0 {
        for (w, z) in w.iter_mut().zip(z) {
            *w += a * z;
        }
    } else {
        for (w, z) in w.iter_mut().zip(z) {
            *w = decay * *w + a * z;
        }
    }
}

/// Variances at or below this are treated as zero: such a feature has been (numerically)
/// constant so far, and is centred but not scaled, as scikit-learn's `StandardScaler` does.
/// A floor added to the variance instead would turn the first deviation of a feature that was
/// constant until then (and, after one example, every feature) into a huge value.
pub const VARIANCE_EPSILON: f32 = 1e-12;

/// One standardised feature, given the statistics before it (`inv_n` = `1 / count`).
#[inline(always)]
pub(crate) fn standardize_one(x: f32, mean: f32, m2: f32, inv_n: f32) -> f32 {
    let var = m2 * inv_n;
    let std = if var > VARIANCE_EPSILON { var.sqrt() } else { 1.0 };
    (x - mean) / std
}

/// Welford's update of one feature's mean and sum of squared deviations with `x`
/// (`inv_n1` = `1 / (count + 1)`): the new `(mean, m2)`.
#[inline(always)]
pub(crate) fn observe_one(x: f32, mean: f32, m2: f32, inv_n1: f32) -> (f32, f32) {
    let delta = x - mean;
    let new_mean = mean + delta * inv_n1;
    (new_mean, m2 + delta * (x - new_mean))
}

/// One AdaGrad coordinate with gradient `g`: `G += g²`, `w -= lr * g / (sqrt(G) + eps)`.
#[inline(always)]
pub(crate) fn adagrad_coordinate(w: &mut f32, sum_sq: &mut f32, g: f32, lr: f32, epsilon: f32) {
    *sum_sq += g * g;
    *w -= lr * g / (sum_sq.sqrt() + epsilon);
}

/// The hyperparameters of one FTRL-Proximal coordinate update.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FtrlParams {
    pub inv_alpha: f32,
    pub beta: f32,
    pub l1: f32,
    pub l2: f32,
}

/// FTRL-Proximal's closed-form weight for accumulators `z` and `n` (McMahan et al. 2013,
/// algorithm 1): zero while `|z| <= l1`, else `-(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2)`.
#[inline(always)]
pub(crate) fn ftrl_weight(z: f32, n: f32, p: FtrlParams) -> f32 {
    // Written as a select over both arms, which LLVM vectorises; the division is harmless
    // when its result is discarded.
    let w = (p.l1.copysign(z) - z) / ((p.beta + n.sqrt()) * p.inv_alpha + p.l2);
    if z.abs() > p.l1 {
        w
    } else {
        0.0
    }
}

/// One FTRL-Proximal coordinate with gradient `g`: updates the accumulators `z` and `n` and
/// recomputes the weight `w` from them, so that it is ready for prediction.
#[inline(always)]
pub(crate) fn ftrl_coordinate(w: &mut f32, z: &mut f32, n: &mut f32, g: f32, p: FtrlParams) {
    let n_new = *n + g * g;
    let sigma = (n_new.sqrt() - n.sqrt()) * p.inv_alpha;
    *z += g - sigma * *w;
    *n = n_new;
    *w = ftrl_weight(*z, n_new, p);
}

/// Above `ln(f32::MAX)` the exponential overflows to infinity.
const EXP_MAX: f32 = 88.722_84;
/// Below `ln(2^-150)`, half the smallest subnormal, the exponential rounds to zero.
const EXP_MIN: f32 = -103.972_08;

/// `e^x` in f32 from IEEE-exact operations only, so that every platform computes the same bits
/// (the platform libm's `expf` may differ between versions). Cody-Waite range reduction to
/// `x = k ln 2 + r`, `|r| <= ln 2 / 2`, and Cephes' minimax polynomial for `e^r`; the error is
/// within about 1 ulp.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln 2 split so that k * LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_359_4; // exactly 0.693359375 = 355 / 512
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even), exactly.
    const ROUND: f32 = 12_582_912.0;
    if x.is_nan() {
        return x;
    }
    if x > EXP_MAX {
        return f32::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let r2 = r * r;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_6e-1) * r + 0.5;
    let er = (p * r2 + r) + 1.0;
    // 2^k in two factors, each a normal f32 for every k that occurs (-150..=128): the first
    // product is exact, so only the last one rounds, also where the result is subnormal.
    let k = k as i32;
    let half = k / 2;
    er * pow2(half) * pow2(k - half)
}

/// `2^k` for `-126 <= k <= 127`, built from its bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    debug_assert!((-126..=127).contains(&k));
    f32::from_bits(((k + 127) as u32) << 23)
}

/// Turns `logits` into probabilities in place and returns `(max, ln(sum of e^(logit - max)))`,
/// whose sum is the log normaliser: the log-loss of class `y` is `ln_sum - (logit_y - max)`.
/// An empty slice returns `(0, 0)`.
#[inline(always)]
pub(crate) fn softmax_in_place(logits: &mut [f32]) -> (f32, f32) {
    if logits.is_empty() {
        return (0.0, 0.0);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in logits.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    for v in logits.iter_mut() {
        *v /= sum;
    }
    (max, sum.ln())
}

/// The index of the largest value, the first one on ties; `None` for an empty slice.
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::testutil::Rng;

    fn random_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    /// Both instruction sets (the same one twice where the CPU has only the baseline).
    fn paths() -> [SimdPath; 2] {
        [SimdPath::detect(), SimdPath::Portable]
    }

    #[test]
    fn dot_and_matvec_match_f64_reference_on_every_path() {
        let mut rng = Rng::new(1);
        for d in [0, 1, 5, 15, 16, 17, 33, 100, 1280] {
            for k in [1, 3, 4, 5, 9, 10] {
                let m = random_vec(&mut rng, k * d);
                let x = random_vec(&mut rng, d);
                let results = paths().map(|path| {
                    let mut out = vec![f32::NAN; k];
                    path.matvec(&m, &x, &mut out);
                    out
                });
                let out = &results[0];
                assert_eq!(bits(out), bits(&results[1]), "d={d} k={k}: paths differ");
                for r in 0..k {
                    let row = &m[r * d..(r + 1) * d];
                    let exact: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = row.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    assert!((out[r] as f64 - exact).abs() <= 1e-6 * (scale + 1.0), "d={d} k={k} r={r}");
                    // A row's sum does not depend on the block it was computed in.
                    assert_eq!(out[r].to_bits(), dot(row, &x).to_bits(), "d={d} k={k} r={r}");
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn all_finite_finds_every_kind_of_non_finite_value() {
        for path in paths() {
            let mut x = vec![1.5f32; 37];
            assert!(path.all_finite(&x));
            assert!(path.all_finite(&[]));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for pos in [0, 15, 16, 31, 32, 36] {
                    let keep = x[pos];
                    x[pos] = bad;
                    assert!(!path.all_finite(&x), "{bad} at {pos}");
                    x[pos] = keep;
                }
            }
            // Huge but finite values must not overflow the check.
            assert!(path.all_finite(&[f32::MAX; 40]));
        }
    }

    #[test]
    fn sgd_step_matches_the_scalar_formula_on_every_path() {
        let mut rng = Rng::new(2);
        for d in [1, 3, 16, 37] {
            let z = random_vec(&mut rng, d);
            let w0 = random_vec(&mut rng, 3 * d);
            let steps = [0.025, -0.05, 0.0125];
            for path in paths() {
                for decay in [1.0, 0.9] {
                    let mut w = w0.clone();
                    path.sgd_apply(&mut w, &z, &steps, decay);
                    for (i, w) in w.iter().enumerate() {
                        let (k, j) = (i / d, i % d);
                        let want = if decay == 1.0 { w0[i] + steps[k] * z[j] } else { decay * w0[i] + steps[k] * z[j] };
                        assert_eq!(w.to_bits(), want.to_bits(), "d={d} decay={decay} i={i}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_step_and_matvec_equal_the_step_then_the_matvec() {
        let mut rng = Rng::new(5);
        for d in [1, 15, 16, 17, 40, 1280] {
            for k in [1, 3, 4, 6, 10] {
                let w0 = random_vec(&mut rng, k * d);
                let (z, x) = (random_vec(&mut rng, d), random_vec(&mut rng, d));
                let steps = random_vec(&mut rng, k);
                for decay in [1.0, 0.999] {
                    let step = SgdStep { steps: &steps, decay, features: &z };
                    // The reference: the step, then the product, on the baseline path.
                    let mut stepped = w0.clone();
                    SimdPath::Portable.sgd_apply(&mut stepped, &z, &steps, decay);
                    let mut want = vec![0.0; k];
                    SimdPath::Portable.matvec(&stepped, &x, &mut want);
                    for path in paths() {
                        let mut out = vec![f32::NAN; k];
                        path.matvec_after_step(&w0, step, &x, &mut out);
                        assert_eq!(bits(&out), bits(&want), "{path} read-only d={d} k={k}");
                        let mut w = w0.clone();
                        let mut out = vec![f32::NAN; k];
                        path.apply_step_matvec(&mut w, step, &x, &mut out);
                        assert_eq!(bits(&out), bits(&want), "{path} fused d={d} k={k}");
                        assert_eq!(bits(&w), bits(&stepped), "{path} fused weights d={d} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn adaptive_steps_match_their_coordinate_formulas_on_every_path() {
        let mut rng = Rng::new(3);
        let d = 37;
        let x = random_vec(&mut rng, d);
        let coeffs = [0.3, -0.7];
        let w0 = random_vec(&mut rng, 2 * d);
        let acc0: Vec<f32> = random_vec(&mut rng, 2 * d).iter().map(|v| v.abs()).collect();
        let params = FtrlParams { inv_alpha: 10.0, beta: 1.0, l1: 0.2, l2: 0.1 };
        for path in paths() {
            let (mut w, mut g2) = (w0.clone(), acc0.clone());
            path.adagrad_step(
                &mut w,
                &mut g2,
                &x,
                &coeffs,
                AdagradConfig { learning_rate: 0.1, epsilon: 1e-8, l2: 0.01 },
            );
            let (mut fw, mut z, mut n) = (w0.clone(), w0.clone(), acc0.clone());
            path.ftrl_step(&mut fw, &mut z, &mut n, &x, &coeffs, params);
            for i in 0..2 * d {
                let (k, j) = (i / d, i % d);
                let (mut w1, mut g21) = (w0[i], acc0[i]);
                adagrad_coordinate(&mut w1, &mut g21, coeffs[k] * x[j] + 0.01 * w0[i], 0.1, 1e-8);
                assert_eq!((w[i].to_bits(), g2[i].to_bits()), (w1.to_bits(), g21.to_bits()), "adagrad {i}");
                let (mut fw1, mut z1, mut n1) = (w0[i], w0[i], acc0[i]);
                ftrl_coordinate(&mut fw1, &mut z1, &mut n1, coeffs[k] * x[j], params);
                assert_eq!([fw[i], z[i], n[i]].map(f32::to_bits), [fw1, z1, n1].map(f32::to_bits), "ftrl {i}");
            }
        }
    }

    #[test]
    fn ftrl_weight_is_zero_within_l1_and_shrunk_beyond() {
        let p = FtrlParams { inv_alpha: 2.0, beta: 1.0, l1: 1.0, l2: 0.5 };
        assert_eq!(ftrl_weight(0.9, 4.0, p), 0.0);
        assert_eq!(ftrl_weight(-1.0, 4.0, p), 0.0);
        // -(3 - 1) / ((1 + 2) * 2 + 0.5)
        assert_eq!(ftrl_weight(3.0, 4.0, p), -2.0 / 6.5);
        assert_eq!(ftrl_weight(-3.0, 4.0, p), 2.0 / 6.5);
    }

    #[test]
    fn exp_is_accurate_over_its_whole_range() {
        let mut worst_ulps = 0.0f64;
        let mut x = -110.0f32;
        while x < 90.0 {
            let got = exp(x);
            let want = (x as f64).exp();
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else if want >= f32::MIN_POSITIVE as f64 {
                // Relative error in units of f32's epsilon.
                let ulps = ((got as f64 - want) / want).abs() / f32::EPSILON as f64;
                worst_ulps = worst_ulps.max(ulps);
            } else {
                // Subnormal range: absolute error within one subnormal step.
                assert!((got as f64 - want).abs() <= 1.5e-45, "exp({x}) = {got}, want {want}");
            }
            x += 0.001_3;
        }
        assert!(worst_ulps < 2.0, "worst error {worst_ulps} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_normalises_and_reports_the_log_normaliser() {
        let mut v = vec![1.0f32, 2.0, 3.0, -1000.0];
        let (max, ln_sum) = softmax_in_place(&mut v);
        let exact: Vec<f64> = {
            let e: Vec<f64> = [1.0f64, 2.0, 3.0, -1000.0].iter().map(|l| (l - 3.0).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        for (p, q) in v.iter().zip(&exact) {
            assert!((*p as f64 - q).abs() < 1e-6);
        }
        assert_eq!(max, 3.0);
        let lse = (1.0f64.exp() + 2.0f64.exp() + 3.0f64.exp()).ln();
        assert!(((max + ln_sum) as f64 - lse).abs() < 1e-6);
        assert_eq!(softmax_in_place(&mut []), (0.0, 0.0));
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), Some(1));
        assert_eq!(argmax(&[-3.0]), Some(0));
    }
}
