//! The EXPR challenge metric: per-frame F1 of each of the 8 classes over all frames of a split pooled together
//! (frames labelled -1 ignored), and their unweighted mean, the macro F1. A class absent from both labels and
//! predictions scores 0, as scikit-learn's `f1_score(average="macro", labels=range(8))` does (with a warning).

use serde::{Deserialize, Serialize};

use crate::affwild2::{Expression, NUM_CLASSES};

/// `counts[truth][predicted]` over the frames with a label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub counts: [[u64; NUM_CLASSES]; NUM_CLASSES],
}

impl Confusion {
    /// Adds one frame; a truth of -1 is ignored. `predicted` must be a class index.
    pub fn add(&mut self, truth: i8, predicted: u8) {
        if truth >= 0 {
            self.counts[truth as usize][predicted as usize] += 1;
        }
    }

    /// Sums another matrix in (ranks, videos).
    pub fn merge(&mut self, other: &Confusion) {
        for (row, other_row) in self.counts.iter_mut().zip(&other.counts) {
            for (c, o) in row.iter_mut().zip(other_row) {
                *c += o;
            }
        }
    }

    pub fn frames(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Labelled frames of class `c`.
    pub fn support(&self, c: usize) -> u64 {
        self.counts[c].iter().sum()
    }

    pub fn f1(&self, c: usize) -> f64 {
        let tp = self.counts[c][c] as f64;
        let predicted: u64 = self.counts.iter().map(|row| row[c]).sum();
        let denominator = predicted as f64 + self.support(c) as f64;
        if denominator == 0.0 { 0.0 } else { 2.0 * tp / denominator }
    }

    pub fn f1_per_class(&self) -> [f64; NUM_CLASSES] {
        std::array::from_fn(|c| self.f1(c))
    }

    pub fn macro_f1(&self) -> f64 {
        self.f1_per_class().iter().sum::<f64>() / NUM_CLASSES as f64
    }

    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..NUM_CLASSES).map(|c| self.counts[c][c]).sum();
        if self.frames() == 0 { 0.0 } else { correct as f64 / self.frames() as f64 }
    }

    /// The paper's class-wise table (label, train ratio %, F1), then the macro F1 and the confusion matrix.
    /// The class-wise table: per class the training set's share of labelled frames (`train_ratios`, fractions
    /// as `manifest.class_ratios` holds them; without them, the scored frames' own shares), F1 and support;
    /// macro F1; the confusion matrix.
    pub fn render(&self, train_ratios: Option<&[f64; NUM_CLASSES]>) -> String {
        let frames = self.frames().max(1) as f64;
        let (header, ratio): (&str, Box<dyn Fn(usize) -> f64>) = match train_ratios {
            Some(r) => ("Train Ratio(%)", Box::new(move |c| 100.0 * r[c])),
            None => ("Share(%)", Box::new(move |c| 100.0 * self.support(c) as f64 / frames)),
        };
        let mut out = format!("{:<10} {:>15} {:>8} {:>10}\n", "Label", header, "F1", "frames");
        for (c, e) in Expression::ALL.iter().enumerate() {
            out.push_str(&format!("{:<10} {:>15.2} {:>8.4} {:>10}\n", e.name(), ratio(c), self.f1(c), self.support(c)));
        }
        out.push_str(&format!(
            "Macro F1 {:.4} over {} frames (accuracy {:.4})\n\n",
            self.macro_f1(),
            self.frames(),
            self.accuracy()
        ));
        out.push_str(&format!("{:<10}", "truth\\pred"));
        for e in Expression::ALL {
            out.push_str(&format!(" {:>9}", &e.name()[..e.name().len().min(9)]));
        }
        out.push('\n');
        for (c, e) in Expression::ALL.iter().enumerate() {
            out.push_str(&format!("{:<10}", e.name()));
            for n in self.counts[c] {
                out.push_str(&format!(" {n:>9}"));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_by_hand() {
        let mut m = Confusion::default();
        // Class 0: 2 right, 1 predicted as 1; class 1: 1 right; one ignored frame.
        for (t, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (-1, 3)] {
            m.add(t, p);
        }
        assert_eq!(m.frames(), 4);
        assert!((m.f1(0) - 2.0 * 2.0 / (2.0 + 3.0)).abs() < 1e-12);
        assert!((m.f1(1) - 2.0 * 1.0 / (2.0 + 1.0)).abs() < 1e-12);
        assert_eq!(m.f1(5), 0.0, "a class absent from labels and predictions counts 0");
        assert!((m.macro_f1() - (0.8 + 2.0 / 3.0) / 8.0).abs() < 1e-12);
        let mut twice = m.clone();
        twice.merge(&m);
        assert_eq!(twice.frames(), 8);
        assert!(m.render(Some(&[0.125; 8])).contains("Macro F1 0.1833"));
        assert!(m.render(Some(&[0.125; 8])).contains("12.50"));
    }
}
