//! The int8 stage of the compile: calibration and the agreement-scored search on training images
//! (never val or test), the layers kept f32 (budget, or slower here), the manifest's record of it,
//! narrowed weight storage, and the int8-vs-f32 speed check on this machine.

use super::*;

/// `--weights f16|int8`: the graph with its large f32 tensors stored narrower (see
/// [`graft_runtime::weights`]); `None` for `--weights f32`, where the graph is used as it is.
pub(super) fn narrow_weights(
    graph: &[u8],
    storage: WeightStorage,
    manifest: &mut Manifest,
    reporter: &dyn Reporter,
) -> Result<Option<Vec<u8>>> {
    manifest.weights = storage;
    if storage == WeightStorage::F32 {
        return Ok(None);
    }
    let narrowed =
        graft_runtime::weights::narrow(graph, storage).map_err(|reason| CompileError::Graph {
            stage: "weight storage",
            reason,
        })?;
    reporter.message(&format!(
        "weights   stored as {}: graph {:.1} MiB -> {:.1} MiB (widened to f32 when loaded)",
        storage.name(),
        graph.len() as f64 / (1 << 20) as f64,
        narrowed.len() as f64 / (1 << 20) as f64
    ));
    Ok(Some(narrowed))
}

/// Pairs of runs [`speed_check`] times.
pub(super) const SPEED_CHECK_PAIRS: usize = 30;

/// Times the quantized `graph` against the f32 graph it came from, in alternation on this
/// machine (one thread, a synthetic picture), and warns when int8 is not the faster one: the
/// artifact records the measurement either way.
pub(super) fn speed_check(
    manifest: &Manifest,
    graph: &[u8],
    f32_graph: &[u8],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<SpeedCheck> {
    let f32_model = graph_model(&all_f32(manifest), f32_graph, options)?;
    let int8_model = graph_model(manifest, graph, options)?;
    let input = vec![manifest
        .preprocessing
        .apply(&graft_runtime::bench::synthetic_image())];
    let (f32_time, int8_time, ratio) = graft_runtime::bench::alternate(
        [&f32_model, &int8_model],
        [&input, &input],
        SPEED_CHECK_PAIRS,
        5,
    )?;
    let check = SpeedCheck {
        f32_ms: f32_time.p50 as f32,
        int8_ms: int8_time.p50 as f32,
        ratio: ratio.p50 as f32,
        kernels: graft_runtime::kernels::Level::current().name().into(),
        cpu: graft_runtime::bench::cpu_name(),
    };
    reporter.message(&format!(
        "speed     int8 {:.2} ms vs f32 {:.2} ms per image on this machine ({:.2}x, {} kernels, 1 thread, {} alternating pairs)",
        check.int8_ms, check.f32_ms, check.ratio, check.kernels, SPEED_CHECK_PAIRS
    ));
    if check.ratio >= 1.0 {
        reporter.message(&format!(
            "warning   the int8 artifact runs {:.2}x the f32 time on this machine ({}, {} kernels): \
             compile with --precision f32 to deploy here, or --int8-layers faster to keep f32 where int8 is slower",
            check.ratio, check.cpu, check.kernels
        ));
    }
    Ok(check)
}

/// Most training images the int8 search runs on (a seeded sample beyond that).
pub(super) const MAX_PROBE_IMAGES: usize = 1000;

/// Up to `limit` images of `samples` in a seeded order, as [`Preprocessing::pixels`], with
/// their labels; images that do not decode are skipped (the data check reported them). Decoded
/// on `threads` threads, in the same order as one thread would.
pub(super) fn input_pixels(
    samples: &[Sample],
    limit: usize,
    seed: (u64, &str),
    preprocessing: &Preprocessing,
    threads: usize,
) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut order: Vec<&Sample> = samples.iter().collect();
    Rng::new(seed.0, seed.1).shuffle(&mut order);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let mut candidates = order.as_slice();
    while images.len() < limit && !candidates.is_empty() {
        let (batch, rest) = candidates.split_at((limit - images.len()).min(candidates.len()));
        candidates = rest;
        let decoded = par_map(
            batch,
            threads,
            |sample| {
                preprocessing
                    .load(&sample.path)
                    .ok()
                    .map(|image| (preprocessing.pixels(&image), sample.label))
            },
            || (),
        );
        for (pixels, label) in decoded.into_iter().flatten() {
            images.push(pixels);
            labels.push(label);
        }
    }
    (images, labels)
}

/// The images the int8 search may look at: never those accuracy is reported on.
pub(super) struct ProbeSamples<'a> {
    /// The images the head was fit on (calibration comes from these).
    pub(super) fit: &'a [Sample],
    /// The images for choices, which the head was not fit on.
    pub(super) select: &'a [Sample],
    /// Where `select` came from (`train holdout`, `val`).
    pub(super) select_source: &'a str,
}

impl ProbeSamples<'_> {
    /// Up to [`MAX_PROBE_IMAGES`] images as [`Preprocessing::pixels`], a seeded sample of the
    /// images for choices and the fitted ones together; and what they are in words. (Taking the
    /// images for choices first, which the head has not seen, was measured on flowers5 and
    /// changed nothing on val: 2.9 % of its predictions changed against 2.8 %, with 9 layers
    /// back in f32 instead of 5.)
    fn pixels(
        &self,
        seed: u64,
        preprocessing: &Preprocessing,
        threads: usize,
    ) -> (Vec<Vec<u8>>, String) {
        let both: Vec<Sample> = self.select.iter().chain(self.fit).cloned().collect();
        let (images, _) = input_pixels(
            &both,
            MAX_PROBE_IMAGES,
            (seed, "quantization probe"),
            preprocessing,
            threads,
        );
        let words = format!(
            "{} ({} and fitted training images)",
            count(images.len(), "image"),
            self.select_source
        );
        (images, words)
    }
}

/// `--precision int8`: calibrates on a seeded sample of the training images, chooses the
/// calibration method and the layers kept in f32 by simulating on up to [`MAX_PROBE_IMAGES`]
/// images of `samples` ([`search`]: top-1 agreement with f32, no labels), and quantizes. The
/// images accuracy is reported on are never looked at.
pub(super) fn quantize_graph(
    folded: FoldedModel,
    samples: &ProbeSamples,
    preprocessing: &Preprocessing,
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<(Vec<u8>, QuantizationInfo)> {
    let seed = options.train.seed;
    let (calibration, calibration_images) =
        calibrate_on(&folded.model, samples.fit, preprocessing, options)?;
    let (probe_images, probe_words) = samples.pixels(seed, preprocessing, options.threads);
    let probe = Probe::new(
        &folded.model,
        probe_images,
        preprocessing,
        None,
        options.threads,
    )?;
    let search_options = SearchOptions {
        methods: options
            .calibration
            .map_or(CalibrationMethod::ALL.to_vec(), |m| vec![m]),
        budget: options.accuracy_budget,
        base: QuantizeConfig::default(),
    };
    let result = search(
        &folded.model,
        &calibration,
        &probe,
        &search_options,
        reporter,
    )?;
    if reporter.cancelled() {
        return Err(CompileError::Interrupted);
    }
    report_search(&result, &probe_words, options, reporter);
    let ranges = calibration.ranges(result.method);
    let mut config = result.config.clone();
    let timings = if options.int8_only_where_faster {
        keep_slower_layers_f32(&folded.model, &ranges, &mut config, reporter)?
    } else {
        vec![]
    };
    let layers = layer_precisions(&folded.model, &config, &result, &timings)?;
    let quantized = quantize(&folded.model, &ranges, &config)?;
    let int8 = layers.iter().filter(|l| l.precision == "int8").count();
    reporter.message(&format!(
        "quantize  int8: {int8} of {} layers, {} activation ranges from {calibration_images} training images",
        layers.len(),
        result.method.name()
    ));
    let product_macs = Some(total_product_macs(&folded.model)?);
    let graph = FoldedModel {
        model: quantized,
        classes: folded.classes,
    }
    .to_nnef()?;
    let info = QuantizationInfo {
        method: describe_quantization(result.method, &config),
        calibration_images,
        layers,
        f32_val_accuracy: None,
        val_accuracy: None,
        calibration_trials: calibration_trials(&result),
        accuracy_budget: Some(options.accuracy_budget as f32),
        simulated_accuracy: None,
        probe: Some(probe_words),
        agreement: Some(result.simulated.agreement as f32),
        speed: None,
        product_macs,
    };
    Ok((graph, info))
}

/// Activation ranges of `model` measured on `options.calibration_images` seeded images of `fit`,
/// and how many images that was (undecodable ones are skipped).
pub(super) fn calibrate_on(
    model: &TypedModel,
    fit: &[Sample],
    preprocessing: &Preprocessing,
    options: &CompileOptions,
) -> Result<(Calibration, usize)> {
    let (pixels, _) = input_pixels(
        fit,
        options.calibration_images,
        (options.train.seed, "calibration"),
        preprocessing,
        options.threads,
    );
    let inputs = pixels
        .iter()
        .map(|pixels| input_tensor(preprocessing, pixels))
        .collect::<Result<Vec<_>>>()?;
    Ok((calibrate(model, &inputs, |_| {})?, pixels.len()))
}

/// `--int8-layers faster`: times every int8 layer of `config` alone on this machine and keeps in
/// f32 those slower in int8; returns the timings.
pub(super) fn keep_slower_layers_f32(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &mut QuantizeConfig,
    reporter: &dyn Reporter,
) -> Result<Vec<LayerTiming>> {
    let timings = time_layers(model, ranges, config, 15)?;
    let slower: Vec<&LayerTiming> = timings.iter().filter(|t| t.int8_ms > t.f32_ms).collect();
    config
        .keep_f32
        .extend(slower.iter().map(|t| t.layer.clone()));
    reporter.message(&format!(
        "quantize  timed alone here: {} of {} int8 layers are slower than in f32 and stay f32 (int8 {:.2} ms vs f32 {:.2} ms in all)",
        slower.len(),
        timings.len(),
        timings.iter().map(|t| t.int8_ms).sum::<f64>(),
        timings.iter().map(|t| t.f32_ms).sum::<f64>(),
    ));
    Ok(timings)
}

/// Every quantizable layer's precision under `config`, with its timings when measured and why it
/// stayed f32 when it did.
pub(super) fn layer_precisions(
    model: &TypedModel,
    config: &QuantizeConfig,
    result: &SearchResult,
    timings: &[LayerTiming],
) -> Result<Vec<LayerPrecision>> {
    let mut layers = plan(model, config)?;
    for layer in &mut layers {
        let timing = timings.iter().find(|t| t.layer == layer.layer);
        layer.timed_ms = timing.map(|t| [t.f32_ms as f32, t.int8_ms as f32]);
        layer.reason = if result.fallbacks.iter().any(|f| f.layer == layer.layer) {
            Some(artifact::KEPT_F32_FOR_BUDGET.into())
        } else if layer.kind == "depthwise" && !config.depthwise {
            Some(artifact::KEPT_F32_NO_INT8_DEPTHWISE.into())
        } else if timing.is_some_and(|t| t.int8_ms > t.f32_ms) {
            Some(artifact::KEPT_F32_SLOWER_IN_INT8.into())
        } else {
            None
        };
    }
    Ok(layers)
}

/// The quantization scheme in words, as the artifact records it.
pub(super) fn describe_quantization(method: CalibrationMethod, config: &QuantizeConfig) -> String {
    format!(
        "{} activation ranges (asymmetric per tensor), int8 weights symmetric per {}",
        method.name(),
        if config.per_channel {
            format!(
                "output channel (per tensor for convolutions of more than {} outputs)",
                crate::quantize::MAX_PER_CHANNEL_CONV_OUTPUTS
            )
        } else {
            "tensor".into()
        }
    )
}

/// Every calibration method the search tried, as the artifact records it.
pub(super) fn calibration_trials(result: &SearchResult) -> Vec<CalibrationTrial> {
    result
        .trials
        .iter()
        .map(|t| CalibrationTrial {
            method: t.method.name().into(),
            simulated_accuracy: None,
            agreement: Some(t.measurement.agreement as f32),
            divergence: Some(t.measurement.divergence as f32),
        })
        .collect()
}

/// Prints what the int8 search measured and chose.
pub(super) fn report_search(
    result: &SearchResult,
    probe: &str,
    options: &CompileOptions,
    reporter: &dyn Reporter,
) {
    let changed = |m: &Measurement| {
        format!(
            "{:.2} % changed (divergence {:.4})",
            m.disagreement() * 100.0,
            m.divergence
        )
    };
    let trials: Vec<String> = result
        .trials
        .iter()
        .map(|t| format!("{} {}", t.method.name(), changed(&t.measurement)))
        .collect();
    reporter.message(&format!(
        "quantize  simulated int8 on {probe} against f32, top-1 predictions: {}; using {}",
        trials.join(", "),
        result.method.name()
    ));
    if let Some(per_channel) = result.per_channel {
        reporter.message(&format!(
            "quantize  per-channel weight scales: {} ({})",
            changed(&per_channel),
            if result.config.per_channel {
                "kept: closer to f32"
            } else {
                "not kept: no closer to f32"
            }
        ));
    }
    let budget = options.accuracy_budget * 100.0;
    let now = changed(&result.simulated);
    if result.fallbacks.is_empty() {
        reporter.message(&format!(
            "quantize  {now}, within the {budget:.2} % budget: no layer falls back to f32"
        ));
    } else {
        let names: Vec<&str> = result.fallbacks.iter().map(|f| f.layer.as_str()).collect();
        reporter.message(&format!(
            "quantize  {} most sensitive layers back to f32 for the {budget:.2} % budget ({now} now): {}",
            names.len(),
            names.join(", ")
        ));
    }
}
