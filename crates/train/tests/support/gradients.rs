//! Comparing a loss and its gradients with the ones another pass computed.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use candle_core::Tensor;
use medcoder_train::trainable::Trainable;

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Losses within 1e-5 and every gradient within 2e-4 of the largest of `want`'s.
pub fn assert_same(
    case: &str,
    trainable: &Trainable,
    (want_loss, want): (f64, &[Option<Tensor>]),
    (loss, got): (f64, &[Option<Tensor>]),
) {
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "{case}: loss {loss} vs {want_loss}"
    );
    for ((name, _), (w, g)) in trainable.vars.iter().zip(want.iter().zip(got)) {
        let w = w.as_ref().unwrap();
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{case}: {name} got no gradient"));
        let scale = max_abs(w);
        let diff = max_abs(&(w - g).unwrap());
        assert!(
            scale > 0.0 && diff <= 2e-4 * scale,
            "{case}: {name} differs by {diff} (max {scale})"
        );
    }
}
