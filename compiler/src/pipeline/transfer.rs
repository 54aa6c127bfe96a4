//! The training stage's drivers: the head on frozen features (epoch or L2 strength chosen on
//! training images), fine-tuning or training from scratch, and what they report.

use super::*;

/// Shows an epoch's record; asks training to stop when the user pressed Ctrl-C.
pub(super) fn report_epoch(reporter: &dyn Reporter, record: &EpochRecord) -> ControlFlow<()> {
    reporter.epoch(record);
    if reporter.cancelled() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// Trains the head on frozen features (the whole job of `--strategy head`, the first step of
/// `finetune`): on `train`, its epoch chosen on `val` (the images from `select_source`); logreg
/// and svm choose their L2 strength by cross-validation instead and fit `train` and `val`.
pub(super) fn train_probe_head(
    options: &CompileOptions,
    (train, val): (&Features, &Features),
    classes: usize,
    select_source: &str,
    reporter: &dyn Reporter,
) -> Result<TrainedHead> {
    let balance = if options.train.balance_classes {
        ", classes weighted by inverse frequency"
    } else {
        ""
    };
    reporter.message(&match options.train.head {
        HeadKind::LogReg | HeadKind::Svm => format!(
            "train     {} head: L2 strength from {:?} by stratified {CV_FOLDS}-fold cross-validation, seed {}{balance}",
            options.train.head, LAMBDA_PATH, options.train.seed
        ),
        _ => format!(
            "train     {} head: AdamW lr {} weight decay {} batch {} up to {} epochs (patience {}), seed {}{balance}",
            options.train.head,
            options.train.learning_rate,
            options.train.weight_decay,
            options.train.batch_size,
            options.train.epochs,
            options.train.patience,
            options.train.seed,
        ),
    });
    // Cross-validation on the training images is the convex heads' choice: they fit every
    // training image, the held-out-for-choices ones included (whose history numbers are then
    // in-sample).
    let convex = matches!(options.train.head, HeadKind::LogReg | HeadKind::Svm);
    let fitted = if convex {
        Cow::Owned(train.concat(val))
    } else {
        Cow::Borrowed(train)
    };
    let head = train_head(
        &options.train,
        &fitted,
        val,
        classes,
        &Device::Cpu,
        &mut |r| report_epoch(reporter, r),
    )?;
    let best = *head.best();
    reporter.message(&if convex {
        format!(
            "kept      L2 strength {} of {} by {CV_FOLDS}-fold cross-validation on {} training images: cross-validated accuracy {:.4}",
            head.best_epoch,
            head.history.len(),
            fitted.rows(),
            best.train_accuracy,
        )
    } else {
        format!(
            "kept      epoch {} of {} by {select_source} loss: train accuracy {:.4}, {select_source} accuracy {:.4} (loss {:.4})",
            head.best_epoch,
            head.history.len(),
            best.train_accuracy,
            best.val_accuracy,
            best.val_loss
        )
    });

    Ok(head)
}

/// Fine-tunes (or trains from scratch) the backbone and the head, reporting what it does.
pub(super) fn finetune_backbone(
    frozen: &Frozen,
    (train, val): (&[Sample], &[Sample]),
    classes: usize,
    probe_head: Option<&TrainedHead>,
    config: &FinetuneConfig,
    threads: usize,
    reporter: &dyn Reporter,
) -> Result<crate::finetune::FineTuned> {
    let what = match (&config.strategy, &config.unfreeze) {
        (Strategy::Scratch, _) => "every layer from random weights".to_string(),
        (_, Unfreeze::All) => "every backbone layer".to_string(),
        (_, Unfreeze::Blocks(n)) => format!("the top {n} blocks"),
        (_, Unfreeze::From(t)) => format!("everything after {t:?}"),
    };
    reporter.message(&format!(
        "{:<9} {what} + head: {} backbone lr {} head lr {} weight decay {} {} schedule, batch {}, up to {} epochs (patience {}){}",
        config.strategy.to_string(),
        config.optimizer,
        config.backbone_learning_rate,
        config.head_learning_rate,
        config.weight_decay,
        config.schedule,
        config.batch_size,
        config.epochs,
        config.patience,
        if config.augmentation.is_some() { ", augmented" } else { ", no augmentation" }
    ));
    let data = FinetuneData {
        backbone: frozen.backbone,
        cut: frozen.cut_name,
        preprocessing: frozen.preprocessing,
        train,
        val,
        classes,
        initial_head: probe_head,
    };
    let tuned = finetune(&data, config, threads, reporter, &mut |r| {
        report_epoch(reporter, r)
    })?;
    let info = &tuned.info;
    reporter.message(&format!(
        "trained   {} weights in {} blocks after {:?} ({}): kept epoch {} of {} (by loss on the images for choices, accuracy {:.4}); {:.1} s, {:.1} images/s forward+backward",
        info.trainable_weights,
        info.unfrozen_blocks.len(),
        info.boundary,
        info.unfrozen_blocks.join(", "),
        info.best_epoch,
        info.epochs_run,
        tuned.head.best().val_accuracy,
        info.seconds,
        info.train_images_per_second
    ));
    Ok(tuned)
}

pub(super) fn head_train_accuracy(head: &TrainedHead, train: &Features) -> f32 {
    let pairs = train.labels.iter().copied().zip(head.predict(train));
    ConfusionMatrix::from_pairs(head.layers.last().map_or(0, |l| l.outputs), pairs).accuracy()
}
