"""Stage `report`: gather every model's results into metrics JSON keyed by model, and one HTML report."""

import json
from pathlib import Path

import pandas as pd

from pipeline.io import write_json
from pipeline.report.html import Section, build_report
from stages._common import entry, parser
from stages.params import read_params

READS = ("studied_models", "tasks")


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--plots", type=Path, default=Path("plots"))
    p.add_argument("--out", type=Path, required=True, help="the HTML report")
    args = p.parse_args()
    params = read_params(args.params, READS)
    models, tasks = params.studied_models, params.tasks
    quality = {m: _json(args.metrics / "model_quality" / f"{m}.json") for m in models}
    attribution = {m: _json(args.metrics / "attribution" / f"{m}.json") for m in models}
    suppression = {m: _json(args.data / "evaluate" / m / "suppression.json") for m in models}
    steering = {m: _json(args.data / "steer" / m / "steering.json") for m in models}
    write_json({m: s.get("relative_drop", {}) for m, s in suppression.items()}, args.metrics / "suppression.json")
    write_json({m: {"summary": s.get("summary", {}), "baseline": s.get("baseline", {})} for m, s in suppression.items()},
               args.metrics / "suppression_summary.json")
    write_json(steering, args.metrics / "steering.json")

    sections = [Section("Model quality", "Generative utility of each model on the held-out test split "
                        "(VQA accuracy, OCR ANLS, caption BLEU-4, retrieval NDCG@5).",
                        table=pd.DataFrame({m: q for m, q in quality.items() if q}).T if any(quality.values()) else None)]
    for m in models:
        sections.append(Section(f"{m}: critical heads", "S_t(l, h) = utility drop when head h of layer l is "
                                "mean-substituted, on the discovery split; one heatmap per task.",
                                images=[args.data / "heads" / m / t / "heatmap.png" for t in tasks]))
        sections.append(Section(f"{m}: layers of the selected neurons", "How many of each method's top-rho "
                                "neurons fall in each layer, per task.",
                                images=[args.plots / "attribution" / m / "layer_distribution.png"]))
        sections.append(Section(f"{m}: overlap of HONES masks", "Jaccard overlap of the tasks' HONES neuron sets.",
                                images=[args.plots / "attribution" / m / "overlap.png"]))
        faith = attribution.get(m, {}).get("faithfulness", {})
        if faith:
            rows = {(t, meth): v for t, d in faith.items() for meth, v in d.items()}
            sections.append(Section(f"{m}: faithfulness to ablation", "Spearman correlation of each method's "
                                    "importance with the exact single-neuron ablation effect, and precision@k of "
                                    "its top set against the ablation top set.",
                                    table=pd.DataFrame(rows).T[["spearman", "precision_at_k"]]))
        summ = suppression[m].get("summary", {})
        if summ:
            sections.append(Section(f"{m}: suppression summary", "Mean relative drop (%) on the masked task "
                                    "(diagonal), off it, and selectivity = on-target minus off-target.",
                                    table=pd.DataFrame(summ).T))
            sections.append(Section(f"{m}: suppression matrices", "Relative drop (%) of each evaluated task "
                                    "(column) when the row task's mask is zeroed, test split, per method.",
                                    images=sorted((args.data / "evaluate" / m).glob("suppression_*.png"))))
        steer = steering[m]
        if steer:
            sections.append(Section(f"{m}: steering", "Test utility per task under each steering variant "
                                    "(learned HONES scales vs base, fixed amplification, grid search, no-KL, "
                                    "learned scales on random neurons).",
                                    table=pd.DataFrame({k: v for k, v in steer.items()}).T))
    build_report("HONES report", f"Models: {', '.join(models)}; tasks: {', '.join(tasks)}.", sections, args.out)


if __name__ == "__main__":
    main()
