"""Evaluation: the papers' metrics and experiments, and the measurements of the implementation.

metrics, inception, evaluate   FID, KID, FwV, LPIPS diversity, PRD, IvO on held-out photos (`chimle eval`)
efficiency, ablation           the sample-efficiency curve (CHIMLE Fig. 2) and the ablation ladder (Fig. 7)
held_out, stats, report        held-out crops and reusable metrics; means and z over seeds; Markdown/HTML reports
mnist_illustration             TIM Fig. 1 on MNIST (`chimle mnist`)
digits, digit_table            CHIMLE against cIMLE on digits, scored by a digit classifier
cpu_report                     the text of `chimle reproduce`'s report, from the parts' results
speed, precision, ddp_check    speed and memory, bf16 against float32, DDP against one process (`chimle bench`)
"""
