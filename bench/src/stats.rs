//! Small statistics: medians and spreads of noisy measurements.

/// The median (mean of the middle two for even counts); NaN for no samples.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Smallest and largest value.
pub fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// The median of each round, then the median of those, and their range: the figure and how
/// much it moved between rounds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min_round: f64,
    pub max_round: f64,
    pub rounds: usize,
}

impl Summary {
    pub fn of_rounds(round_values: &[f64]) -> Summary {
        let (lo, hi) = range(round_values);
        Summary {
            median: median(round_values),
            min_round: lo,
            max_round: hi,
            rounds: round_values.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(range(&[2.0, 5.0, 1.0]), (1.0, 5.0));
    }
}
