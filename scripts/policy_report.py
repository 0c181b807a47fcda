"""One row of RESULTS.md's InstructGPT comparison for any trained policy: the same held-out
world prompts, seed and measures as ppo.py's final report (oracle points, exact-correct rate,
KL from the SFT model, RM score, pretraining loss), and the paired difference to the SFT model.

    python scripts/policy_report.py --policy runs/dpo_rm/model --sft runs/default/SFT/model \
        --reward_model runs/rm/model

It reuses ppo.evaluate_policy, so a DPO or self-rewarding model is measured exactly as PPO is.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import evaluate  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402
import tasks  # noqa: E402
from data import encode_documents  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from train_utils import get_device  # noqa: E402
from reward import load_reward_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True)
    p.add_argument("--sft", required=True, help="the SFT model: the reference for the KL and the baseline")
    p.add_argument("--reward_model", default="", help="reward.py's out_dir/model (optional: the RM score column)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    cfg = ppo.PPOConfig(init=args.sft, reward="oracle", value_init="zero")
    device = get_device(args.device)
    policy, tok = load_checkpoint(args.policy, device, dropout=0.0)
    reference, _ = load_checkpoint(args.sft, device, dropout=0.0)
    rm = load_reward_model(args.reward_model, device, head="saved", dropout=0.0)[0].eval() if args.reward_model else None
    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    prompts = [t.prompt for t in eval_tasks]
    corpus = encode_documents(tok, sft.world_corpus(cfg)[1])  # held-out pretraining documents, as ppo.py
    rows = {}
    for name, model in (("sft", reference), ("policy", policy)):
        rows[name] = ppo.evaluate_policy(model.eval(), reference, rm, tok, prompts, eval_tasks, cfg, corpus, device)
    c = evaluate.compare(rows["policy"]["points"], rows["sft"]["points"], seed=cfg.seed)
    for name, r in rows.items():
        print(f"{name:6s} oracle {r['oracle_mean']:.3f}  exact {100 * r['exact_correct']:.1f}%  "
              f"KL from SFT {r['kl_from_sft']:.2f}  RM {r.get('rm_score', float('nan')):+.2f}  "
              f"pretraining loss {r['pretrain_loss']:.3f}")
    print(f"policy - SFT: {c['mean_diff']:+.3f} (95% CI {c['mean_diff_ci'][0]:+.3f} .. {c['mean_diff_ci'][1]:+.3f}), "
          f"win/tie/loss {c['win']:.1f}/{c['tie']:.1f}/{c['loss']:.1f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
