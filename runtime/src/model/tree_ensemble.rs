//! `TreeEnsembleClassifier` and `TreeEnsembleRegressor` (`ai.onnx.ml`): what
//! scikit-learn's random forests, gradient boosting and decision trees become
//! through skl2onnx (and LightGBM / XGBoost through onnxmltools).
//!
//! tract-onnx has its own implementation, but it evaluates a tree by scanning
//! every leaf of the ensemble for each tree and row, so a 50-tree gradient
//! boosting model ran 60 times slower than onnxruntime at batch 1 and 500
//! times slower at batch 32. It also gets the two-class layout skl2onnx
//! writes wrong (labels inverted). This module replaces it:
//!
//! - **Load** ([`Ensemble::build`]): the `nodes_*` / `class_*` (or
//!   `target_*`) attribute tuples become one flat node array. Each branch node
//!   holds its feature, threshold, comparison, missing-value direction and the
//!   array indices of its two children; each leaf holds a range of the weight
//!   array. Every tree is walked once from its root (node id 0): a child id
//!   that does not exist, a node reached twice (a cycle, or a subtree shared
//!   by two parents), a feature or class index out of range are refused with
//!   a [`TreeError`], so evaluation can never loop or index out of bounds.
//! - **Run**: one walk per tree and row (O(depth)), sums into a score per
//!   class or target, then base values and `post_transform` the way
//!   onnxruntime does, including its two-class conventions (see
//!   [`Classifier::finalize`]).
//!
//! Both are registered under the operator names through tract-onnx's op
//! register, replacing tract's versions, and wired as one typed op so the
//! optimizer leaves them alone.
//!
//! Not supported, refused at load with a reason: string class labels
//! (Outpost exchanges numeric tensors; re-export with integer labels), the
//! double-precision `*_as_tensor` attributes, `PROBIT` on a one-score binary
//! classifier (onnxruntime leaves half of that output undefined).

use std::collections::HashMap;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Registers both operators, replacing tract-onnx's own.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("TreeEnsembleClassifier", parse_classifier);
    reg.insert("TreeEnsembleRegressor", parse_regressor);
}

/// Why a tree ensemble's attributes were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TreeError {
    #[error("attribute {0} is required")]
    Missing(&'static str),
    #[error("attribute {attr} has {got} entries, expected {expected}")]
    Length {
        attr: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("attribute {attr}[{index}]: {reason}")]
    Value {
        attr: &'static str,
        index: usize,
        reason: String,
    },
    #[error("tree {tree}: {reason}")]
    Structure { tree: i64, reason: String },
    #[error("{0}")]
    Unsupported(String),
}

// ------------------------------------------------------------ the ensemble

/// How a branch node compares `x[feature]` with its threshold; true goes to
/// the true child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => Mode::Leaf,
            _ => return None,
        })
    }
}

/// One node of the flat array. For a branch, `a` and `b` are the array
/// indices of the true and false children; for a leaf, the range `a..b` of
/// [`Ensemble::weights`].
#[derive(Clone, Copy, Debug)]
struct Node {
    feature: u32,
    threshold: f32,
    mode: Mode,
    /// `nodes_missing_value_tracks_true`: a NaN feature takes the true branch.
    /// Otherwise NaN compares false everywhere (so `BRANCH_NEQ` is true).
    nan_is_true: bool,
    a: u32,
    b: u32,
}

impl Node {
    #[inline]
    fn goes_true(&self, x: f32) -> bool {
        let t = self.threshold;
        let cmp = match self.mode {
            Mode::Leq => x <= t,
            Mode::Lt => x < t,
            Mode::Gte => x >= t,
            Mode::Gt => x > t,
            Mode::Eq => x == t,
            Mode::Neq => x != t,
            Mode::Leaf => false,
        };
        cmp || (self.nan_is_true && x.is_nan())
    }
}

/// The attribute tuples of a tree ensemble, as the ONNX node carries them
/// (`nodes_*`, then `class_*` or `target_*` for the leaf weights).
#[derive(Clone, Debug, Default)]
pub struct TreeAttributes {
    pub tree_ids: Vec<i64>,
    pub node_ids: Vec<i64>,
    pub feature_ids: Vec<i64>,
    pub values: Vec<f32>,
    pub modes: Vec<String>,
    pub true_ids: Vec<i64>,
    pub false_ids: Vec<i64>,
    /// Empty, or one flag per node.
    pub missing_tracks_true: Vec<i64>,
    pub leaf_tree_ids: Vec<i64>,
    pub leaf_node_ids: Vec<i64>,
    /// Class (classifier) or target (regressor) index of each weight.
    pub leaf_targets: Vec<i64>,
    pub leaf_weights: Vec<f32>,
}

/// A validated ensemble: evaluation cannot loop and cannot index out of
/// bounds once the input has [`Ensemble::n_features`] columns.
#[derive(Clone, Debug)]
pub struct Ensemble {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    /// (class or target index, weight), grouped by leaf.
    weights: Vec<(u32, f32)>,
    n_targets: usize,
    n_features: usize,
    /// Every branch is `BRANCH_LEQ` without missing-value tracking, as
    /// scikit-learn exports: the walk then skips the mode dispatch.
    all_leq: bool,
}

fn check_len(attr: &'static str, got: usize, expected: usize) -> Result<(), TreeError> {
    if got != expected {
        return Err(TreeError::Length {
            attr,
            expected,
            got,
        });
    }
    Ok(())
}

impl Ensemble {
    /// Validates the attributes and lays the trees out for evaluation.
    /// `n_targets` is the number of classes (classifier) or targets
    /// (regressor); `leaf_prefix` names the weight attributes in errors.
    pub fn build(
        attrs: &TreeAttributes,
        n_targets: usize,
        leaf_prefix: &str,
    ) -> Result<Ensemble, TreeError> {
        let n = attrs.node_ids.len();
        if n == 0 {
            return Err(TreeError::Missing("nodes_nodeids"));
        }
        check_len("nodes_treeids", attrs.tree_ids.len(), n)?;
        check_len("nodes_featureids", attrs.feature_ids.len(), n)?;
        check_len("nodes_values", attrs.values.len(), n)?;
        check_len("nodes_modes", attrs.modes.len(), n)?;
        check_len("nodes_truenodeids", attrs.true_ids.len(), n)?;
        check_len("nodes_falsenodeids", attrs.false_ids.len(), n)?;
        if !attrs.missing_tracks_true.is_empty() {
            check_len(
                "nodes_missing_value_tracks_true",
                attrs.missing_tracks_true.len(),
                n,
            )?;
        }
        let w = attrs.leaf_weights.len();
        let leaf_attr = |suffix: &str| -> &'static str {
            match (leaf_prefix, suffix) {
                ("class", "treeids") => "class_treeids",
                ("class", "nodeids") => "class_nodeids",
                ("class", "ids") => "class_ids",
                ("target", "treeids") => "target_treeids",
                ("target", "nodeids") => "target_nodeids",
                _ => "target_ids",
            }
        };
        check_len(leaf_attr("treeids"), attrs.leaf_tree_ids.len(), w)?;
        check_len(leaf_attr("nodeids"), attrs.leaf_node_ids.len(), w)?;
        check_len(leaf_attr("ids"), attrs.leaf_targets.len(), w)?;
        if n_targets == 0 {
            return Err(TreeError::Unsupported(
                "the ensemble has no class or target".into(),
            ));
        }

        let mut modes = Vec::with_capacity(n);
        for (ix, m) in attrs.modes.iter().enumerate() {
            let mode = Mode::parse(m).ok_or_else(|| TreeError::Value {
                attr: "nodes_modes",
                index: ix,
                reason: format!("unknown mode {m:?}"),
            })?;
            modes.push(mode);
        }

        // (tree id, node id) -> position in the attribute arrays. Trees are
        // evaluated in the order their ids first appear, as onnxruntime does.
        let mut position: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
        let mut tree_order: Vec<i64> = Vec::new();
        let mut trees_seen = std::collections::HashSet::new();
        for ix in 0..n {
            let key = (attrs.tree_ids[ix], attrs.node_ids[ix]);
            if position.insert(key, ix).is_some() {
                return Err(TreeError::Structure {
                    tree: key.0,
                    reason: format!("node id {} appears twice", key.1),
                });
            }
            if trees_seen.insert(key.0) {
                tree_order.push(key.0);
            }
        }

        // Walk every tree from its root, numbering nodes in visit order.
        // `new_index[orig]` is set the first time a node is reached; reaching
        // it again means a cycle or a shared subtree, both refused.
        const UNSEEN: u32 = u32::MAX;
        let mut new_index = vec![UNSEEN; n];
        // Attribute positions of each branch's (true, false) children.
        let mut children = vec![(0usize, 0usize); n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        let mut roots = Vec::with_capacity(tree_order.len());
        let mut n_features = 0usize;
        let mut stack: Vec<usize> = Vec::new();
        for &tree in &tree_order {
            let root = *position
                .get(&(tree, 0))
                .ok_or_else(|| TreeError::Structure {
                    tree,
                    reason: "has no node 0 (its root)".into(),
                })?;
            roots.push(order.len() as u32);
            stack.push(root);
            while let Some(ix) = stack.pop() {
                if new_index[ix] != UNSEEN {
                    return Err(TreeError::Structure {
                        tree,
                        reason: format!(
                            "node {} is reached twice: the tree has a cycle or a shared subtree",
                            attrs.node_ids[ix]
                        ),
                    });
                }
                new_index[ix] = order.len() as u32;
                order.push(ix);
                if modes[ix] == Mode::Leaf {
                    continue;
                }
                let feature = attrs.feature_ids[ix];
                if !(0..i64::from(i32::MAX)).contains(&feature) {
                    return Err(TreeError::Value {
                        attr: "nodes_featureids",
                        index: ix,
                        reason: format!("feature {feature} out of range"),
                    });
                }
                n_features = n_features.max(feature as usize + 1);
                let child = |attr: &str, id: i64| {
                    position
                        .get(&(tree, id))
                        .copied()
                        .ok_or_else(|| TreeError::Structure {
                            tree,
                            reason: format!(
                                "{attr} of node {} names node {id}, which does not exist",
                                attrs.node_ids[ix]
                            ),
                        })
                };
                let t = child("nodes_truenodeids", attrs.true_ids[ix])?;
                let f = child("nodes_falsenodeids", attrs.false_ids[ix])?;
                children[ix] = (t, f);
                // The true child is visited first, so it follows its parent.
                stack.push(f);
                stack.push(t);
            }
        }

        // Leaf weights, grouped by leaf in visit order. Weights naming a
        // branch node are ignored, as onnxruntime does (old onnxmltools
        // exports carry some); weights naming no node are refused.
        let mut entries: Vec<(u32, usize)> = Vec::with_capacity(w);
        for k in 0..w {
            let key = (attrs.leaf_tree_ids[k], attrs.leaf_node_ids[k]);
            let ix = *position.get(&key).ok_or_else(|| TreeError::Value {
                attr: leaf_attr("nodeids"),
                index: k,
                reason: format!("node {} of tree {} does not exist", key.1, key.0),
            })?;
            let target = attrs.leaf_targets[k];
            if !(0..n_targets as i64).contains(&target) {
                return Err(TreeError::Value {
                    attr: leaf_attr("ids"),
                    index: k,
                    reason: format!("index {target} out of range (0..{n_targets})"),
                });
            }
            if modes[ix] == Mode::Leaf && new_index[ix] != UNSEEN {
                entries.push((new_index[ix], k));
            }
        }
        entries.sort_by_key(|e| *e);

        let mut nodes = Vec::with_capacity(order.len());
        let mut weights = Vec::with_capacity(entries.len());
        let mut next_entry = 0;
        let mut all_leq = true;
        for (new_ix, &ix) in order.iter().enumerate() {
            let nan_is_true = attrs.missing_tracks_true.get(ix).is_some_and(|v| *v != 0);
            let node = if modes[ix] == Mode::Leaf {
                let start = weights.len() as u32;
                while next_entry < entries.len() && entries[next_entry].0 as usize == new_ix {
                    let k = entries[next_entry].1;
                    weights.push((attrs.leaf_targets[k] as u32, attrs.leaf_weights[k]));
                    next_entry += 1;
                }
                Node {
                    feature: 0,
                    threshold: 0.0,
                    mode: Mode::Leaf,
                    nan_is_true,
                    a: start,
                    b: weights.len() as u32,
                }
            } else {
                let (t, f) = children[ix];
                all_leq &= modes[ix] == Mode::Leq && !nan_is_true;
                Node {
                    feature: attrs.feature_ids[ix] as u32,
                    threshold: attrs.values[ix],
                    mode: modes[ix],
                    nan_is_true,
                    a: new_index[t],
                    b: new_index[f],
                }
            };
            nodes.push(node);
        }
        Ok(Ensemble {
            nodes,
            roots,
            weights,
            n_targets,
            n_features,
            all_leq,
        })
    }

    /// Columns the input needs: the highest feature index used, plus one.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn n_trees(&self) -> usize {
        self.roots.len()
    }

    /// The leaf `row` reaches in the tree rooted at `root`.
    #[inline]
    fn leaf(&self, root: u32, row: &[f32]) -> &Node {
        let mut node = &self.nodes[root as usize];
        if self.all_leq {
            while node.mode != Mode::Leaf {
                let next = if row[node.feature as usize] <= node.threshold {
                    node.a
                } else {
                    node.b
                };
                node = &self.nodes[next as usize];
            }
        } else {
            while node.mode != Mode::Leaf {
                let next = if node.goes_true(row[node.feature as usize]) {
                    node.a
                } else {
                    node.b
                };
                node = &self.nodes[next as usize];
            }
        }
        node
    }

    /// Aggregates every tree's leaf weights for one row into `scores`;
    /// `has[k]` tells whether any leaf contributed to `k` (onnxruntime's
    /// `has_score`, which its finalization depends on).
    fn aggregate(&self, row: &[f32], agg: Aggregate, scores: &mut [f32], has: &mut [bool]) {
        scores.fill(0.0);
        has.fill(false);
        for &root in &self.roots {
            let leaf = self.leaf(root, row);
            for &(k, w) in &self.weights[leaf.a as usize..leaf.b as usize] {
                let (s, h) = (&mut scores[k as usize], &mut has[k as usize]);
                *s = match agg {
                    Aggregate::Sum | Aggregate::Average => *s + w,
                    Aggregate::Min if *h => s.min(w),
                    Aggregate::Max if *h => s.max(w),
                    Aggregate::Min | Aggregate::Max => w,
                };
                *h = true;
            }
        }
    }
}

// ------------------------------------------------------- post transforms

/// `post_transform` of both operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl PostTransform {
    pub fn parse(s: &str) -> Option<PostTransform> {
        Some(match s {
            "NONE" => PostTransform::None,
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX" => PostTransform::Softmax,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            "PROBIT" => PostTransform::Probit,
            _ => return None,
        })
    }

    /// Applies the transform to a row of scores, in place.
    fn apply(self, v: &mut [f32]) {
        match self {
            PostTransform::None => {}
            PostTransform::Logistic => v.iter_mut().for_each(|x| *x = logistic(*x)),
            PostTransform::Probit => v.iter_mut().for_each(|x| *x = probit(*x)),
            PostTransform::Softmax => {
                let max = v.iter().fold(-f32::MAX, |m, x| if *x > m { *x } else { m });
                let mut sum = 0.0;
                for x in v.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                v.iter_mut().for_each(|x| *x /= sum);
            }
            // Softmax over the non-zero scores: a zero stays (almost) zero
            // instead of weighing exp(0).
            PostTransform::SoftmaxZero => {
                let max = v.iter().fold(-f32::MAX, |m, x| if *x > m { *x } else { m });
                let exp_neg_max = (-max).exp();
                let mut sum = 0.0;
                for x in v.iter_mut() {
                    if x.abs() > 1e-7 {
                        *x = (*x - max).exp();
                        sum += *x;
                    } else {
                        *x *= exp_neg_max;
                    }
                }
                v.iter_mut().for_each(|x| *x /= sum);
            }
        }
    }
}

/// onnxruntime's formulation: exp of a non-positive number only, so no
/// overflow for large |x|.
fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 {
        1.0 - v
    } else {
        v
    }
}

/// sqrt(2) * erfinv(2p - 1) with onnxruntime's erfinv approximation
/// (Winitzki's), so outputs match it rather than an exact inverse.
fn probit(p: f32) -> f32 {
    let x = 2.0 * p - 1.0;
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let ln = ((1.0 - x) * (1.0 + x)).ln();
    let a = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * ln;
    let b = ln / 0.147;
    let erfinv = sign * ((-a + (a * a - b).sqrt()).sqrt());
    std::f32::consts::SQRT_2 * erfinv
}

/// `aggregate_function` of the regressor (the classifier always sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

// ------------------------------------------------------------ classifier

/// A `TreeEnsembleClassifier`: labels `[N]` (int64) and scores `[N, classes]`.
#[derive(Clone, Debug)]
pub struct Classifier {
    pub ensemble: Ensemble,
    pub labels: Vec<i64>,
    pub base_values: Vec<f32>,
    pub post_transform: PostTransform,
    /// onnxruntime's "binary case": two labels, and every leaf weight is for
    /// the same class. The trees then compute one score, and the two columns
    /// are derived from it.
    binary_case: bool,
    weights_all_positive: bool,
}

impl Classifier {
    pub fn new(
        ensemble: Ensemble,
        labels: Vec<i64>,
        base_values: Vec<f32>,
        post_transform: PostTransform,
    ) -> Result<Classifier, TreeError> {
        let classes = labels.len();
        if classes < 2 {
            return Err(TreeError::Unsupported(format!(
                "{classes} class label(s): at least two are needed"
            )));
        }
        if !(base_values.is_empty()
            || base_values.len() == classes
            || (classes == 2 && base_values.len() == 1))
        {
            return Err(TreeError::Length {
                attr: "base_values",
                expected: classes,
                got: base_values.len(),
            });
        }
        let first_class = ensemble.weights.first().map(|w| w.0);
        let binary_case = classes == 2
            && first_class.is_some()
            && ensemble.weights.iter().all(|w| Some(w.0) == first_class);
        let weights_all_positive = ensemble.weights.iter().all(|w| w.1 >= 0.0);
        if binary_case && post_transform == PostTransform::Probit {
            return Err(TreeError::Unsupported(
                "PROBIT on a two-class ensemble whose leaves score one class: onnxruntime leaves half of \
                 that output undefined"
                    .into(),
            ));
        }
        Ok(Classifier {
            ensemble,
            labels,
            base_values,
            post_transform,
            binary_case,
            weights_all_positive,
        })
    }

    pub fn classes(&self) -> usize {
        self.labels.len()
    }

    /// Runs `rows` (row-major, `width` columns each) into labels and scores.
    pub fn eval(&self, rows: &[f32], width: usize) -> (Vec<i64>, Vec<f32>) {
        let c = self.classes();
        let n = rows.len().checked_div(width).unwrap_or(0);
        let mut labels = Vec::with_capacity(n);
        let mut probs = vec![0.0f32; n * c];
        let mut scores = vec![0.0f32; c];
        let mut has = vec![false; c];
        for (row, out) in rows
            .chunks_exact(width.max(1))
            .zip(probs.chunks_exact_mut(c))
        {
            self.ensemble
                .aggregate(row, Aggregate::Sum, &mut scores, &mut has);
            labels.push(self.finalize(&mut scores, &mut has, out));
        }
        (labels, probs)
    }

    /// Base values, label and output scores of one row, following
    /// onnxruntime (1.32) case by case. With more than two classes: add the
    /// base values, label = highest score, transform. With two, the trees
    /// may score one class only (skl2onnx's layout for binary gradient
    /// boosting, random forests and decision trees): the single score `s`
    /// becomes `[1 - s, s]` when every weight is positive (a probability),
    /// `[-s, s]` (or their logistic) otherwise (a margin), and the label is
    /// positive when `s > 0.5`, respectively `s > 0`.
    fn finalize(&self, s: &mut [f32], h: &mut [bool], out: &mut [f32]) -> i64 {
        let base = &self.base_values;
        if self.classes() > 2 {
            for (k, b) in base.iter().enumerate() {
                s[k] = if h[k] { s[k] + b } else { *b };
                h[k] = true;
            }
            let mut best: Option<usize> = None;
            for k in 0..s.len() {
                if h[k] && best.is_none_or(|b| s[k] > s[b]) {
                    best = Some(k);
                }
            }
            for k in 0..s.len() {
                out[k] = if h[k] { s[k] } else { 0.0 };
            }
            self.post_transform.apply(out);
            return self.labels[best.unwrap_or(0)];
        }

        // Two classes. `additional` is onnxruntime's write_additional_scores:
        // how the second column derives from a single score.
        let mut additional = -1;
        let single = match base.len() {
            2 => {
                if h[1] {
                    // onnxruntime's reading when both base values are given
                    // and class 1 has a score: base[0] is not used.
                    s[1] = base[1] + s[0];
                    s[0] = -s[1];
                } else {
                    s[1] += base[1];
                    s[0] += base[0];
                }
                false
            }
            1 => {
                s[0] += base[0];
                !h[1]
            }
            _ => {
                additional = 3;
                !h[1]
            }
        };
        let pos = if !single && h[1] {
            s[1]
        } else if h[0] {
            s[0]
        } else {
            0.0
        };
        let positive = if self.binary_case {
            let (threshold, if_pos, if_neg) = if self.weights_all_positive {
                (0.5, 0, 1)
            } else {
                (0.0, 2, 3)
            };
            let positive = pos > threshold;
            additional = if positive { if_pos } else { if_neg };
            positive
        } else {
            pos > 0.0
        };
        // onnxruntime outputs 1 / 0 here when the leaves score both classes;
        // with labels [0, 1] (scikit-learn) that is the same as this.
        let label = self.labels[usize::from(positive)];

        if !single {
            out[0] = if h[0] { s[0] } else { 0.0 };
            out[1] = if h[1] { s[1] } else { 0.0 };
            self.post_transform.apply(out);
            return label;
        }
        let x = if h[0] { s[0] } else { 0.0 };
        let logistic_tf = self.post_transform == PostTransform::Logistic;
        match additional {
            0 | 1 => {
                let p = if logistic_tf { logistic(x) } else { x };
                out[0] = 1.0 - p;
                out[1] = p;
            }
            2 | 3 if logistic_tf => {
                out[0] = logistic(-x);
                out[1] = logistic(x);
            }
            2 | 3 => {
                out[0] = -x;
                out[1] = x;
            }
            // Leaves scoring both classes, but none reached class 1 for this
            // row: onnxruntime writes the one score and leaves the second
            // column undefined; here it is 0.
            _ => {
                out[0] = if self.post_transform == PostTransform::Probit {
                    probit(x)
                } else {
                    x
                };
                out[1] = 0.0;
            }
        }
        label
    }
}

// ------------------------------------------------------------- regressor

/// A `TreeEnsembleRegressor`: `[N, n_targets]` floats.
#[derive(Clone, Debug)]
pub struct Regressor {
    pub ensemble: Ensemble,
    pub base_values: Vec<f32>,
    pub aggregate: Aggregate,
    pub post_transform: PostTransform,
}

impl Regressor {
    pub fn new(
        ensemble: Ensemble,
        base_values: Vec<f32>,
        aggregate: Aggregate,
        post_transform: PostTransform,
    ) -> Result<Regressor, TreeError> {
        let targets = ensemble.n_targets;
        if !(base_values.is_empty() || base_values.len() == targets) {
            return Err(TreeError::Length {
                attr: "base_values",
                expected: targets,
                got: base_values.len(),
            });
        }
        Ok(Regressor {
            ensemble,
            base_values,
            aggregate,
            post_transform,
        })
    }

    pub fn targets(&self) -> usize {
        self.ensemble.n_targets
    }

    pub fn eval(&self, rows: &[f32], width: usize) -> Vec<f32> {
        let t = self.targets();
        let n = rows.len().checked_div(width).unwrap_or(0);
        let mut out = vec![0.0f32; n * t];
        let mut scores = vec![0.0f32; t];
        let mut has = vec![false; t];
        let trees = self.ensemble.n_trees() as f32;
        for (row, out) in rows.chunks_exact(width.max(1)).zip(out.chunks_exact_mut(t)) {
            self.ensemble
                .aggregate(row, self.aggregate, &mut scores, &mut has);
            for k in 0..t {
                let base = self.base_values.get(k).copied().unwrap_or(0.0);
                let v = match self.aggregate {
                    Aggregate::Average => scores[k] / trees + base,
                    Aggregate::Sum => scores[k] + base,
                    Aggregate::Min | Aggregate::Max if has[k] => scores[k] + base,
                    Aggregate::Min | Aggregate::Max => base,
                };
                // onnxruntime: a single target always gets its value (and
                // only PROBIT applies to it); with several, a target no leaf
                // scored reads 0.
                out[k] = if t == 1 || has[k] { v } else { 0.0 };
            }
            if t == 1 {
                if self.post_transform == PostTransform::Probit {
                    out[0] = probit(out[0]);
                }
            } else {
                self.post_transform.apply(out);
            }
        }
        out
    }
}

// ------------------------------------------------------ ONNX attributes

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &str) -> Vec<i64> {
    attr(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn floats(node: &NodeProto, name: &str) -> Vec<f32> {
    attr(node, name)
        .map(|a| a.floats.clone())
        .unwrap_or_default()
}

fn strings(node: &NodeProto, name: &str) -> Vec<String> {
    attr(node, name)
        .map(|a| {
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn string(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// Reads the node and leaf tuples; `leaf_prefix` is `class` or `target`.
pub fn tree_attributes(node: &NodeProto, leaf_prefix: &str) -> Result<TreeAttributes, TreeError> {
    for name in [
        "nodes_values_as_tensor",
        "nodes_hitrates_as_tensor",
        "base_values_as_tensor",
    ]
    .into_iter()
    .chain(
        [format!("{leaf_prefix}_weights_as_tensor")]
            .iter()
            .map(String::as_str),
    ) {
        if attr(node, name).is_some() {
            return Err(TreeError::Unsupported(format!(
                "attribute {name} (double-precision trees) is not supported; export with float thresholds"
            )));
        }
    }
    let leaf = |s: &str| format!("{leaf_prefix}_{s}");
    Ok(TreeAttributes {
        tree_ids: ints(node, "nodes_treeids"),
        node_ids: ints(node, "nodes_nodeids"),
        feature_ids: ints(node, "nodes_featureids"),
        values: floats(node, "nodes_values"),
        modes: strings(node, "nodes_modes"),
        true_ids: ints(node, "nodes_truenodeids"),
        false_ids: ints(node, "nodes_falsenodeids"),
        missing_tracks_true: ints(node, "nodes_missing_value_tracks_true"),
        leaf_tree_ids: ints(node, &leaf("treeids")),
        leaf_node_ids: ints(node, &leaf("nodeids")),
        leaf_targets: ints(node, &leaf("ids")),
        leaf_weights: floats(node, &leaf("weights")),
    })
}

fn post_transform_of(node: &NodeProto) -> Result<PostTransform, TreeError> {
    let s = string(node, "post_transform").unwrap_or_else(|| "NONE".into());
    PostTransform::parse(&s)
        .ok_or_else(|| TreeError::Unsupported(format!("unknown post_transform {s:?}")))
}

pub fn classifier_from_node(node: &NodeProto) -> Result<Classifier, TreeError> {
    if attr(node, "classlabels_strings").is_some() {
        return Err(TreeError::Unsupported(
            "string class labels (classlabels_strings) are not supported: Outpost exchanges numeric \
             tensors; export the classifier with integer labels"
                .into(),
        ));
    }
    let labels = attr(node, "classlabels_int64s")
        .map(|a| a.ints.clone())
        .ok_or(TreeError::Missing("classlabels_int64s"))?;
    let ensemble = Ensemble::build(&tree_attributes(node, "class")?, labels.len(), "class")?;
    Classifier::new(
        ensemble,
        labels,
        floats(node, "base_values"),
        post_transform_of(node)?,
    )
}

pub fn regressor_from_node(node: &NodeProto) -> Result<Regressor, TreeError> {
    let targets = attr(node, "n_targets")
        .map(|a| a.i)
        .ok_or(TreeError::Missing("n_targets"))?;
    if !(1..=1 << 20).contains(&targets) {
        return Err(TreeError::Value {
            attr: "n_targets",
            index: 0,
            reason: format!("{targets} out of range"),
        });
    }
    let aggregate = match string(node, "aggregate_function")
        .as_deref()
        .unwrap_or("SUM")
    {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => {
            return Err(TreeError::Unsupported(format!(
                "unknown aggregate_function {other:?}"
            )))
        }
    };
    let ensemble = Ensemble::build(
        &tree_attributes(node, "target")?,
        targets as usize,
        "target",
    )?;
    Regressor::new(
        ensemble,
        floats(node, "base_values"),
        aggregate,
        post_transform_of(node)?,
    )
}

fn parse_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let classifier = classifier_from_node(node).map_err(|e| format_err!("{e}"))?;
    Ok((
        expand(TreeEnsembleExpansion(Kind::Classifier(Arc::new(
            classifier,
        )))),
        vec![],
    ))
}

fn parse_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let regressor = regressor_from_node(node).map_err(|e| format_err!("{e}"))?;
    Ok((
        expand(TreeEnsembleExpansion(Kind::Regressor(Arc::new(regressor)))),
        vec![],
    ))
}

// ------------------------------------------------------------ tract glue

#[derive(Clone, Debug)]
enum Kind {
    Classifier(Arc<Classifier>),
    Regressor(Arc<Regressor>),
}

impl Kind {
    fn ensemble(&self) -> &Ensemble {
        match self {
            Kind::Classifier(c) => &c.ensemble,
            Kind::Regressor(r) => &r.ensemble,
        }
    }

    fn columns(&self) -> usize {
        match self {
            Kind::Classifier(c) => c.classes(),
            Kind::Regressor(r) => r.targets(),
        }
    }
}

/// The inference-time face of the operator: typing rules, then wiring of
/// [`TreeEnsembleOp`] behind a cast of the input to f32.
#[derive(Clone, Debug)]
struct TreeEnsembleExpansion(Kind);

impl Expansion for TreeEnsembleExpansion {
    fn name(&self) -> StaticName {
        match self.0 {
            Kind::Classifier(_) => "TreeEnsembleClassifier".into(),
            Kind::Regressor(_) => "TreeEnsembleRegressor".into(),
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(match self.0 {
            Kind::Classifier(_) => 2,
            Kind::Regressor(_) => 1,
        })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        let columns = self.0.columns().to_dim();
        match self.0 {
            Kind::Classifier(_) => {
                check_output_arity(outputs, 2)?;
                s.equals(&outputs[0].datum_type, DatumType::I64)?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                s.equals(&outputs[1].datum_type, DatumType::F32)?;
                s.equals(&outputs[1].rank, 2)?;
                s.equals(&outputs[1].shape[0], &inputs[0].shape[0])?;
                s.equals(&outputs[1].shape[1], columns)?;
            }
            Kind::Regressor(_) => {
                check_output_arity(outputs, 1)?;
                s.equals(&outputs[0].datum_type, DatumType::F32)?;
                s.equals(&outputs[0].rank, 2)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                s.equals(&outputs[0].shape[1], columns)?;
            }
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        model.wire_node(prefix, TreeEnsembleOp(self.0.clone()), &[x])
    }
}

/// The typed operator tract runs.
#[derive(Clone, Debug)]
struct TreeEnsembleOp(Kind);

impl PartialEq for TreeEnsembleOp {
    fn eq(&self, other: &Self) -> bool {
        // Two ops are the same when they share the parsed ensemble: the
        // optimizer only needs identity, not a deep comparison of trees.
        match (&self.0, &other.0) {
            (Kind::Classifier(a), Kind::Classifier(b)) => Arc::ptr_eq(a, b),
            (Kind::Regressor(a), Kind::Regressor(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for TreeEnsembleOp {}

impl Op for TreeEnsembleOp {
    fn name(&self) -> StaticName {
        match self.0 {
            Kind::Classifier(_) => "OutpostTreeEnsembleClassifier".into(),
            Kind::Regressor(_) => "OutpostTreeEnsembleRegressor".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let e = self.0.ensemble();
        Ok(vec![format!(
            "{} trees, {} nodes, {} features",
            e.n_trees(),
            e.nodes.len(),
            e.n_features
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for TreeEnsembleOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let view = input.to_plain_array_view::<f32>()?;
        let shape = view.shape().to_vec();
        if shape.len() != 2 {
            bail!("tree ensemble input must be [N, features], got shape {shape:?}");
        }
        let (n, width) = (shape[0], shape[1]);
        let needed = self.0.ensemble().n_features();
        if width < needed {
            bail!(
                "tree ensemble reads feature {} but the input has {width} columns",
                needed - 1
            );
        }
        let contiguous;
        let rows: &[f32] = match view.as_slice() {
            Some(s) => s,
            None => {
                contiguous = view.iter().copied().collect::<Vec<f32>>();
                &contiguous
            }
        };
        match &self.0 {
            Kind::Classifier(c) => {
                let (labels, probs) = c.eval(rows, width);
                Ok(tvec!(
                    Tensor::from_shape(&[n], &labels)?.into_tvalue(),
                    Tensor::from_shape(&[n, c.classes()], &probs)?.into_tvalue()
                ))
            }
            Kind::Regressor(r) => {
                let out = r.eval(rows, width);
                Ok(tvec!(
                    Tensor::from_shape(&[n, r.targets()], &out)?.into_tvalue()
                ))
            }
        }
    }
}

impl TypedOp for TreeEnsembleOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs[0];
        if input.rank() != 2 {
            bail!(
                "tree ensemble input must be [N, features], got rank {}",
                input.rank()
            );
        }
        if let Ok(width) = input.shape[1].to_usize() {
            let needed = self.0.ensemble().n_features();
            if width < needed {
                bail!(
                    "tree ensemble reads feature {} but the input has {width} columns",
                    needed - 1
                );
            }
        }
        let n = input.shape[0].clone();
        Ok(match &self.0 {
            Kind::Classifier(c) => {
                tvec!(i64::fact([n.clone()]), f32::fact([n, c.classes().to_dim()]))
            }
            Kind::Regressor(r) => tvec!(f32::fact([n, r.targets().to_dim()])),
        })
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    //! Expected values marked "onnxruntime" were computed by onnxruntime 1.32
    //! on the same attributes (a model built with `onnx.helper`, run on the
    //! CPU provider), so these tests pin its conventions without Python.

    use super::*;
    use crate::model::{LoadError, LoadOptions, Model, ModelFormat};
    use crate::tensor::{TensorData, TensorValues};

    const NAN: f32 = f32::NAN;

    /// One tree: node 0 tests `x[0] <= 0.5` (true: leaf 1, false: leaf 2).
    fn stump(w1: &[(i64, f32)], w2: &[(i64, f32)]) -> TreeAttributes {
        let mut a = TreeAttributes {
            tree_ids: vec![0, 0, 0],
            node_ids: vec![0, 1, 2],
            feature_ids: vec![0, 0, 0],
            values: vec![0.5, 0.0, 0.0],
            modes: ["BRANCH_LEQ", "LEAF", "LEAF"].map(String::from).to_vec(),
            true_ids: vec![1, 0, 0],
            false_ids: vec![2, 0, 0],
            ..Default::default()
        };
        for (node, ws) in [(1, w1), (2, w2)] {
            for (class, w) in ws {
                a.leaf_tree_ids.push(0);
                a.leaf_node_ids.push(node);
                a.leaf_targets.push(*class);
                a.leaf_weights.push(*w);
            }
        }
        a
    }

    fn classifier(
        attrs: &TreeAttributes,
        labels: &[i64],
        base: &[f32],
        post: &str,
    ) -> Result<Classifier, TreeError> {
        let ensemble = Ensemble::build(attrs, labels.len(), "class")?;
        Classifier::new(
            ensemble,
            labels.to_vec(),
            base.to_vec(),
            PostTransform::parse(post).expect("transform"),
        )
    }

    /// Rows x[0] = 0, 1, 0.5, NaN (x[1] = 0).
    const STUMP_ROWS: [f32; 8] = [0.0, 0.0, 1.0, 0.0, 0.5, 0.0, NAN, 0.0];

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-6 * w.abs(),
                "got {got:?}, want {want:?}"
            );
        }
    }

    fn check(c: &Classifier, rows: &[f32], labels: &[i64], probs: &[f32]) {
        let (l, p) = c.eval(rows, 2);
        assert_eq!(l, labels);
        assert_close(&p, probs);
    }

    #[test]
    fn binary_positive_weights_give_one_minus_p_and_p() {
        // Random forest / decision tree layout: one weight per leaf, class 0.
        let a = stump(&[(0, 0.3)], &[(0, 0.8)]);
        let c = classifier(&a, &[10, 20], &[], "NONE").expect("builds");
        check(
            &c,
            &STUMP_ROWS,
            &[10, 20, 10, 20],
            &[0.7, 0.3, 0.2, 0.8, 0.7, 0.3, 0.2, 0.8],
        );
        // onnxruntime: LOGISTIC applies to p, the label still reads p > 0.5.
        let c = classifier(&a, &[10, 20], &[], "LOGISTIC").expect("builds");
        let (l, p) = c.eval(&STUMP_ROWS[..4], 2);
        assert_eq!(l, [10, 20]);
        assert_close(&p, &[0.425558, 0.574442, 0.310026, 0.689974]);
        let c = classifier(&a, &[10, 20], &[0.25], "NONE").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[20, 20], &[0.45, 0.55, -0.05, 1.05]);
        // SOFTMAX is not applied to the one-score layout (onnxruntime).
        let c = classifier(&a, &[10, 20], &[], "SOFTMAX").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[10, 20], &[0.7, 0.3, 0.2, 0.8]);
    }

    #[test]
    fn binary_margin_gives_minus_s_and_s_or_their_logistic() {
        // Gradient boosting layout: one margin per leaf (mixed signs), class 0.
        let a = stump(&[(0, -0.7)], &[(0, 0.4)]);
        let c = classifier(&a, &[10, 20], &[], "NONE").expect("builds");
        check(
            &c,
            &STUMP_ROWS,
            &[10, 20, 10, 20],
            &[0.7, -0.7, -0.4, 0.4, 0.7, -0.7, -0.4, 0.4],
        );
        let c = classifier(&a, &[10, 20], &[0.25], "LOGISTIC").expect("builds");
        check(
            &c,
            &STUMP_ROWS[..4],
            &[10, 20],
            &[0.610639, 0.389361, 0.34299, 0.65701],
        );
        let c = classifier(&a, &[10, 20], &[0.25, 0.5], "SOFTMAX").expect("builds");
        check(
            &c,
            &STUMP_ROWS[..4],
            &[10, 20],
            &[0.389361, 0.610639, 0.65701, 0.34299],
        );
        let c = classifier(&a, &[10, 20], &[0.25, 0.5], "SOFTMAX_ZERO").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[10, 20], &[1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn binary_layouts_scoring_class_one_or_both_classes() {
        // Leaves score class 1 only (onnxruntime).
        let a = stump(&[(1, 0.3)], &[(1, 0.8)]);
        let c = classifier(&a, &[10, 20], &[], "SOFTMAX").expect("builds");
        check(
            &c,
            &STUMP_ROWS[..4],
            &[10, 20],
            &[0.425557, 0.574442, 0.310026, 0.689974],
        );
        let c = classifier(&a, &[10, 20], &[0.25, 0.5], "NONE").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[10, 10], &[0.0, 0.5, 0.0, 0.5]);
        // Leaves score both classes (onnxruntime; its labels are 1 / 0).
        let a = stump(&[(0, 0.7), (1, 0.3)], &[(0, 0.2), (1, 0.8)]);
        let c = classifier(&a, &[0, 1], &[], "NONE").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[1, 1], &[0.7, 0.3, 0.2, 0.8]);
        let c = classifier(&a, &[0, 1], &[0.25, 0.5], "NONE").expect("builds");
        check(&c, &STUMP_ROWS[..4], &[1, 1], &[-1.2, 1.2, -0.7, 0.7]);
        let c = classifier(&a, &[0, 1], &[0.25], "PROBIT").expect("builds");
        check(
            &c,
            &STUMP_ROWS[..4],
            &[1, 1],
            &[1.64467, -0.524446, -0.125662, 0.841756],
        );
    }

    /// Two trees, three classes, leaves with several weights and negative ones.
    fn three_classes() -> TreeAttributes {
        TreeAttributes {
            tree_ids: vec![0, 0, 0, 1, 1, 1],
            node_ids: vec![0, 1, 2, 0, 1, 2],
            feature_ids: vec![0, 0, 0, 1, 0, 0],
            values: vec![0.5, 0.0, 0.0, 0.25, 0.0, 0.0],
            modes: ["BRANCH_LEQ", "LEAF", "LEAF"]
                .repeat(2)
                .into_iter()
                .map(String::from)
                .collect(),
            true_ids: vec![1, 0, 0, 1, 0, 0],
            false_ids: vec![2, 0, 0, 2, 0, 0],
            leaf_tree_ids: vec![0, 0, 0, 0, 1, 1, 1],
            leaf_node_ids: vec![1, 1, 2, 2, 1, 2, 2],
            leaf_targets: vec![0, 1, 1, 2, 0, 0, 2],
            leaf_weights: vec![0.5, -0.25, 1.5, 0.75, -1.0, 0.3, 0.2],
            ..Default::default()
        }
    }

    const GRID: [f32; 8] = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];

    #[test]
    fn multiclass_matches_onnxruntime_for_every_post_transform() {
        let a = three_classes();
        let base = [0.1, -0.2, 0.3];
        /// post_transform, base values, labels, scores.
        type Case<'a> = (&'a str, &'a [f32], [i64; 4], [f32; 12]);
        #[rustfmt::skip]
        let cases: [Case; 6] = [
            ("NONE", &[], [4, 4, 3, 4], [-0.5, -0.25, 0.0, -1.0, 1.5, 0.75, 0.8, -0.25, 0.2, 0.3, 1.5, 0.95]),
            ("NONE", &base, [5, 4, 3, 4], [-0.4, -0.45, 0.3, -0.9, 1.3, 1.05, 0.9, -0.45, 0.5, 0.4, 1.3, 1.25]),
            ("LOGISTIC", &base, [5, 4, 3, 4], [0.4013124, 0.3893607, 0.5744425, 0.2890505, 0.785835, 0.7407749,
                0.7109495, 0.3893607, 0.6224594, 0.5986876, 0.785835, 0.7772999]),
            ("SOFTMAX", &[], [4, 4, 3, 4], [0.2542752, 0.3264959, 0.419229, 0.0528064, 0.6433137, 0.3038799,
                0.5266625, 0.1842991, 0.2890385, 0.160368, 0.5324405, 0.3071914]),
            ("SOFTMAX", &base, [5, 4, 3, 4], [0.2522079, 0.2399076, 0.5078844, 0.0586383, 0.5292115, 0.4121503,
                0.5182528, 0.134352, 0.3473952, 0.1724361, 0.4241244, 0.4034396]),
            ("SOFTMAX_ZERO", &[], [4, 4, 3, 4], [0.4378235, 0.5621765, 0.0, 0.0528064, 0.6433137, 0.3038799,
                0.5266625, 0.1842991, 0.2890385, 0.160368, 0.5324405, 0.3071914]),
        ];
        for (post, base, labels, probs) in cases {
            let c = classifier(&a, &[3, 4, 5], base, post).expect("builds");
            let (l, p) = c.eval(&GRID, 2);
            assert_eq!(l, labels, "{post} {base:?}");
            assert_close(&p, &probs);
        }
    }

    #[test]
    fn every_branch_mode_and_missing_value_direction() {
        // Node 0 tests x[1] against 0.5: true -> class 2 (label 7), false ->
        // class 0 (label 5). Rows x[1] = 0, 0.5, 1, NaN. onnxruntime.
        let rows = [0.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0, NAN];
        #[rustfmt::skip]
        let cases = [
            ("BRANCH_LEQ", [7, 7, 5, 5]), ("BRANCH_LT", [7, 5, 5, 5]), ("BRANCH_GTE", [5, 7, 7, 5]),
            ("BRANCH_GT", [5, 5, 7, 5]), ("BRANCH_EQ", [5, 7, 5, 5]), ("BRANCH_NEQ", [7, 5, 7, 7]),
        ];
        for (mode, want) in cases {
            for missing_true in [0, 1] {
                let mut a = stump(&[(2, 1.0)], &[(0, 1.0)]);
                a.modes[0] = mode.into();
                a.feature_ids[0] = 1;
                a.missing_tracks_true = vec![missing_true, 0, 0];
                let c = classifier(&a, &[5, 6, 7], &[], "NONE").expect("builds");
                let (labels, _) = c.eval(&rows, 2);
                let mut want = want;
                if missing_true == 1 {
                    want[3] = 7; // NaN takes the true branch
                }
                assert_eq!(labels, want, "{mode}, missing tracks true: {missing_true}");
            }
        }
    }

    #[test]
    fn regressor_aggregates_like_onnxruntime() {
        let single = |agg, base: &[f32]| {
            let mut a = three_classes();
            a.leaf_tree_ids = vec![0, 0, 1, 1];
            a.leaf_node_ids = vec![1, 2, 1, 2];
            a.leaf_targets = vec![0; 4];
            a.leaf_weights = vec![1.5, -2.0, 0.25, 4.0];
            let e = Ensemble::build(&a, 1, "target").expect("builds");
            Regressor::new(e, base.to_vec(), agg, PostTransform::None)
                .expect("regressor")
                .eval(&GRID, 2)
        };
        assert_close(&single(Aggregate::Sum, &[]), &[1.75, -1.75, 5.5, 2.0]);
        assert_close(&single(Aggregate::Sum, &[0.5]), &[2.25, -1.25, 6.0, 2.5]);
        assert_close(
            &single(Aggregate::Average, &[0.5]),
            &[1.375, -0.375, 3.25, 1.5],
        );
        assert_close(&single(Aggregate::Min, &[]), &[0.25, -2.0, 1.5, -2.0]);
        assert_close(&single(Aggregate::Max, &[0.5]), &[2.0, 0.75, 4.5, 4.5]);

        let double = |agg, base: &[f32], post| {
            let mut a = three_classes();
            a.leaf_tree_ids = vec![0, 0, 0, 1, 1];
            a.leaf_node_ids = vec![1, 2, 2, 1, 2];
            a.leaf_targets = vec![0, 0, 1, 0, 1];
            a.leaf_weights = vec![1.5, -2.0, 0.5, 0.25, 4.0];
            let e = Ensemble::build(&a, 2, "target").expect("builds");
            Regressor::new(e, base.to_vec(), agg, post)
                .expect("regressor")
                .eval(&GRID, 2)
        };
        // A target no leaf scored reads 0, base value or not (onnxruntime).
        assert_close(
            &double(Aggregate::Sum, &[0.5, 0.5], PostTransform::None),
            &[2.25, 0.0, -1.25, 1.0, 2.0, 4.5, -1.5, 5.0],
        );
        assert_close(
            &double(Aggregate::Average, &[], PostTransform::None),
            &[0.875, 0.0, -0.875, 0.25, 0.75, 2.0, -1.0, 2.25],
        );
        assert_close(
            &double(Aggregate::Min, &[0.5, 0.5], PostTransform::None),
            &[0.75, 0.0, -1.5, 1.0, 2.0, 4.5, -1.5, 1.0],
        );
        assert_close(
            &double(Aggregate::Sum, &[], PostTransform::Softmax),
            &[
                0.8519527, 0.1480472, 0.0953495, 0.9046505, 0.0758582, 0.9241418, 0.0015012,
                0.9984988,
            ],
        );
    }

    fn refused(a: &TreeAttributes) -> TreeError {
        Ensemble::build(a, 2, "class").expect_err("must be refused")
    }

    #[test]
    fn malformed_trees_are_refused() {
        let good = stump(&[(0, 0.3)], &[(0, 0.8)]);
        Ensemble::build(&good, 2, "class").expect("the base case builds");

        let mut a = good.clone();
        a.true_ids[0] = 7;
        assert!(
            matches!(refused(&a), TreeError::Structure { .. }),
            "child id out of range"
        );
        a.true_ids[0] = -1;
        assert!(
            matches!(refused(&a), TreeError::Structure { .. }),
            "negative child id"
        );

        let mut a = good.clone();
        a.node_ids[2] = 1;
        assert!(
            refused(&a).to_string().contains("appears twice"),
            "duplicate node id"
        );

        let mut a = good.clone();
        a.node_ids = vec![3, 1, 2];
        assert!(refused(&a).to_string().contains("no node 0"), "no root");

        // Cycles: a node pointing back to the root, and to itself.
        let mut a = good.clone();
        a.modes[2] = "BRANCH_LEQ".into();
        a.true_ids[2] = 0;
        a.false_ids[2] = 1;
        assert!(refused(&a).to_string().contains("reached twice"), "cycle");
        let mut a = good.clone();
        a.true_ids[0] = 0;
        assert!(
            refused(&a).to_string().contains("reached twice"),
            "self loop"
        );
        // Both branches to the same leaf: a shared subtree.
        let mut a = good.clone();
        a.false_ids[0] = 1;
        assert!(
            refused(&a).to_string().contains("reached twice"),
            "shared subtree"
        );

        let mut a = good.clone();
        a.feature_ids[0] = -1;
        assert!(matches!(
            refused(&a),
            TreeError::Value {
                attr: "nodes_featureids",
                ..
            }
        ));
        let mut a = good.clone();
        a.modes[0] = "BRANCH_MEMBER".into();
        assert!(matches!(
            refused(&a),
            TreeError::Value {
                attr: "nodes_modes",
                ..
            }
        ));
        let mut a = good.clone();
        a.leaf_targets[0] = 2;
        assert!(matches!(
            refused(&a),
            TreeError::Value {
                attr: "class_ids",
                ..
            }
        ));
        let mut a = good.clone();
        a.leaf_node_ids[0] = 9;
        assert!(matches!(
            refused(&a),
            TreeError::Value {
                attr: "class_nodeids",
                ..
            }
        ));
        let mut a = good.clone();
        a.values.pop();
        assert!(matches!(
            refused(&a),
            TreeError::Length {
                attr: "nodes_values",
                ..
            }
        ));
        let mut a = good.clone();
        a.missing_tracks_true = vec![1];
        assert!(matches!(refused(&a), TreeError::Length { .. }));
        assert!(matches!(
            refused(&TreeAttributes::default()),
            TreeError::Missing(_)
        ));

        // Base values must match the classes; PROBIT on a one-score binary
        // layout is left undefined by onnxruntime.
        assert!(classifier(&good, &[0, 1, 2], &[0.1, 0.2], "NONE").is_err());
        assert!(classifier(&good, &[0, 1], &[], "PROBIT").is_err());
        assert!(classifier(&good, &[0], &[], "NONE").is_err());
    }

    #[test]
    fn a_deep_chain_builds_and_runs_without_recursion() {
        // 100 000 nested branches: building and walking are iterative.
        let depth = 100_000i64;
        let mut a = TreeAttributes::default();
        for id in 0..=depth {
            a.tree_ids.push(0);
            a.node_ids.push(id);
            a.feature_ids.push(0);
            a.values.push(id as f32);
            let leaf = id == depth;
            a.modes.push(if leaf { "LEAF" } else { "BRANCH_GT" }.into());
            a.true_ids.push(if leaf { 0 } else { id + 1 });
            // The false branch of every branch is the final leaf.
            a.false_ids.push(if leaf { 0 } else { depth });
        }
        // Every false branch ends at the same leaf: that is a shared subtree.
        assert!(Ensemble::build(&a, 1, "target").is_err());
        // A proper chain: the false child of node k is a dedicated leaf.
        let mut a = TreeAttributes::default();
        let (mut next, chain) = (1i64, 20_000i64);
        for k in 0..chain {
            let (t, f) = (next, next + 1);
            next += 2;
            for (id, mode, tt, ff) in [
                (if k == 0 { 0 } else { t - 2 }, "BRANCH_GT", t, f),
                (f, "LEAF", 0, 0),
            ] {
                if mode == "LEAF" || k == 0 || id != 0 {
                    a.tree_ids.push(0);
                    a.node_ids.push(id);
                    a.feature_ids.push(0);
                    a.values.push(k as f32);
                    a.modes.push(mode.into());
                    a.true_ids.push(tt);
                    a.false_ids.push(ff);
                }
            }
        }
        a.tree_ids.push(0);
        a.node_ids.push(next - 2);
        a.feature_ids.push(0);
        a.values.push(0.0);
        a.modes.push("LEAF".into());
        a.true_ids.push(0);
        a.false_ids.push(0);
        a.leaf_tree_ids.push(0);
        a.leaf_node_ids.push(next - 2);
        a.leaf_targets.push(0);
        a.leaf_weights.push(1.0);
        let e = Ensemble::build(&a, 1, "target").expect("a chain builds");
        let r = Regressor::new(e, vec![], Aggregate::Sum, PostTransform::None).expect("regressor");
        assert_eq!(
            r.eval(&[1e9], 1),
            [1.0],
            "x above every threshold walks the whole chain"
        );
        assert_eq!(
            r.eval(&[-1.0], 1),
            [0.0],
            "x below the first threshold stops at once"
        );
    }

    // ------------------------------------------------ through the loader

    use prost::Message;
    use tract_onnx::pb::{
        attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
        AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
        TypeProto, ValueInfoProto,
    };

    fn value_info(name: &str, t: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                denotation: String::new(),
                value: Some(match d {
                    Some(d) => tensor_shape_proto::dimension::Value::DimValue(*d),
                    None => tensor_shape_proto::dimension::Value::DimParam("N".into()),
                }),
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                denotation: String::new(),
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: t as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
            }),
            doc_string: String::new(),
        }
    }

    fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn floats_attr(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn strings_attr(name: &str, v: &[String]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Strings as i32,
            strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    /// A model with one TreeEnsembleClassifier on a `[N, 2]` float input.
    fn classifier_model(a: &TreeAttributes, labels: &[i64], post: &str) -> Vec<u8> {
        let attribute = vec![
            ints_attr("nodes_treeids", &a.tree_ids),
            ints_attr("nodes_nodeids", &a.node_ids),
            ints_attr("nodes_featureids", &a.feature_ids),
            floats_attr("nodes_values", &a.values),
            strings_attr("nodes_modes", &a.modes),
            ints_attr("nodes_truenodeids", &a.true_ids),
            ints_attr("nodes_falsenodeids", &a.false_ids),
            ints_attr("class_treeids", &a.leaf_tree_ids),
            ints_attr("class_nodeids", &a.leaf_node_ids),
            ints_attr("class_ids", &a.leaf_targets),
            floats_attr("class_weights", &a.leaf_weights),
            ints_attr("classlabels_int64s", labels),
            AttributeProto {
                name: "post_transform".into(),
                r#type: AttributeType::String as i32,
                s: post.as_bytes().to_vec(),
                ..Default::default()
            },
        ];
        let node = NodeProto {
            input: vec!["x".into()],
            output: vec!["label".into(), "probabilities".into()],
            name: "trees".into(),
            op_type: "TreeEnsembleClassifier".into(),
            domain: "ai.onnx.ml".into(),
            attribute,
            ..Default::default()
        };
        let graph = GraphProto {
            name: "trees".into(),
            node: vec![node],
            input: vec![value_info("x", DataType::Float, &[None, Some(2)])],
            output: vec![
                value_info("label", DataType::Int64, &[None]),
                value_info(
                    "probabilities",
                    DataType::Float,
                    &[None, Some(labels.len() as i64)],
                ),
            ],
            ..Default::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![
                OperatorSetIdProto {
                    domain: String::new(),
                    version: 17,
                },
                OperatorSetIdProto {
                    domain: "ai.onnx.ml".into(),
                    version: 3,
                },
            ],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn loaded_model_runs_the_ensemble_at_any_batch() {
        let bytes = classifier_model(&three_classes(), &[3, 4, 5], "SOFTMAX");
        let model =
            Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()).expect("loads");
        let out = model
            .run(vec![
                TensorData::f32(vec![4, 2], GRID.to_vec()).expect("tensor")
            ])
            .expect("runs");
        assert_eq!(out[0].values, TensorValues::I64(vec![4, 4, 3, 4]));
        let TensorValues::F32(p) = &out[1].values else {
            panic!("float scores")
        };
        assert_close(&p[..3], &[0.2542752, 0.3264959, 0.419229]);
        let one = model
            .run(vec![
                TensorData::f32(vec![1, 2], GRID[2..4].to_vec()).expect("tensor")
            ])
            .expect("runs");
        assert_eq!(one[0].values, TensorValues::I64(vec![4]));
    }

    #[test]
    fn malicious_ensembles_are_load_errors_not_panics() {
        let mut cyclic = three_classes();
        cyclic.modes[2] = "BRANCH_LEQ".into();
        cyclic.true_ids[2] = 0;
        let mut out_of_range = three_classes();
        out_of_range.false_ids[3] = 1 << 40;
        let mut wide = three_classes();
        wide.feature_ids[0] = 5; // the input has 2 columns
        for (what, a) in [
            ("cycle", cyclic),
            ("child id", out_of_range),
            ("feature", wide),
        ] {
            let bytes = classifier_model(&a, &[3, 4, 5], "NONE");
            match Model::from_bytes(&bytes, ModelFormat::Onnx, &LoadOptions::default()) {
                Err(LoadError::Parse { .. } | LoadError::Prepare { .. }) => {}
                other => panic!("{what}: expected a load error, got {other:?}"),
            }
        }
        let mut strings = classifier_model(&three_classes(), &[3, 4, 5], "NONE");
        // Same model with string labels instead of integer ones.
        let mut proto = ModelProto::decode(strings.as_slice()).expect("decodes");
        let node = &mut proto.graph.as_mut().expect("graph").node[0];
        node.attribute.retain(|a| a.name != "classlabels_int64s");
        node.attribute.push(strings_attr(
            "classlabels_strings",
            &["a".into(), "b".into(), "c".into()],
        ));
        strings = proto.encode_to_vec();
        let err = Model::from_bytes(&strings, ModelFormat::Onnx, &LoadOptions::default())
            .expect_err("refused");
        assert!(err.to_string().contains("string class labels"), "{err}");
    }
}
