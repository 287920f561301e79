# scikit-learn's handwritten digits (1,078 train / 719 test, 64 px), a supervised torchvision resnet18
# teacher, distill with nothing but the data, the teacher and the image size. Measured 2026-12-05 on a
# 2-core AMD EPYC KVM guest, no GPU, one thread (a pytest run on the other core): teacher 625 s,
# distill 2,024 s (130 epochs x 30 steps at batch 32).
OMP_NUM_THREADS=1 python benchmarks/heldout_check.py --dataset digits --out runs/heldout-digits --tag defaults
# -> runs/heldout-digits/results-defaults.json (here: supervised-teacher.json), and the run folder's
#    quality.json and config.json (here: supervised-teacher-quality.json, supervised-teacher-config.json)
