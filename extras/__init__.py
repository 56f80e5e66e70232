"""extras: everything the two scripts need that is neither training nor tracking, so that train.py and track.py
read as the method's loops. synth (generated videos), split (the real-data split), mae (MAE pre-training of the
backbone), media (reading frames, videos, GIFs and box files), drawing (boxes on frames, the --save writer, the
success and precision plots), window (the Tk box picker and the --show viewer) and explain (the figures of
`train.py --explain`). They import pntrack, kernels and each other, never train.py or track.py, and pntrack.py
imports none of them: the method stands alone.
"""
