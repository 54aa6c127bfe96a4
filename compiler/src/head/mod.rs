//! Head: a new classifier on the cached features of the frozen backbone, trained with candle
//! ([`train`]: linear softmax or MLP, AdamW, early stopping on the images for choices) or solved to
//! convergence ([`linear`]: logistic regression and linear SVM, L2 strength by cross-validation).

pub mod linear;
pub mod train;
