"""The benchmarks of gluon-qat: measured side by side (interleaved rounds, medians, ratios),
each printing Markdown tables. Run them from the repository root:

    python -m benchmarks.train_step   training-step time of converted vs float nets
    python -m benchmarks.accuracy     float vs PTQ vs QAT top-1 on digits at W8A8 ... W2A2,
                                      through the recipe trainer
    python -m benchmarks.narrow       QAT with EMA vs learned (LSQ) ranges per width, the
                                      best PTQ method, 6-bit 3x3 weights; a compact net
    python -m benchmarks.ptq          PTQ accuracy per calibration method and bit width,
                                      W4A4 mixed precision, KL calibration throughput
    python -m benchmarks.deploy       ncnn int8 vs fp32 latency and size of exported GluonCV
                                      models, per Winograd policy
    python -m benchmarks.agreement    ncnn vs simulation agreement of exported GluonCV models
    python -m benchmarks.winograd     which int8 convs the Winograd bound proves safe, and the
                                      latency of the guards
    python -m benchmarks.zoo          one model of every GluonCV classification family: export,
                                      ncnn vs simulation agreement, int8/fp32 latency
    python -m benchmarks.latency      latency-aware int8 vs all-int8 vs fp32 ncnn models
    python -m benchmarks.memory       peak memory of the ncnn runtime (fp32 vs int8) and of a
                                      float vs QAT training step
    python -m benchmarks.calibration  whole `qat calibrate` img/s per method vs a hybridized
                                      float forward; time and memory per number of images
    python -m benchmarks.detection    a small SSD and YOLOv3 trained on the digits detection
                                      set: float / PTQ / QAT mAP at W8A8 and W4A4, the ncnn
                                      int8 model's mAP, int8 / fp32 latency per input size
    python -m benchmarks.detection_ptq  the PTQ tools on that SSD: mAP per calibration method,
                                      the method chosen by mAP / by the heads' agreement,
                                      mixed precision (8-bit or fp32) within an mAP budget

``python -m benchmarks.<name> --help`` lists a benchmark's options. ``common`` holds what
they share (command line, the GluonCV zoo, interleaved median timing). The package is not
installed with ``qat``: it is the repository's measuring kit, and the library never imports
it.
"""
