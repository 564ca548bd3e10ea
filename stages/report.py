"""Stage `report`: gather every model's results into metrics JSON keyed by model, the verdict
table, and one HTML report that opens with it."""

from pathlib import Path

from pipeline.io import atomic_file, write_json
from pipeline.report.document import markdown_sections, report_sections
from pipeline.report.html import build_report
from pipeline.report.markdown import markdown_document
from pipeline.report.study import (
    head_stabilities,
    read_study_results,
    report_metrics,
    sampled_ground_truths,
    study_verdicts,
)
from stages._common import entry, parser
from stages.params import read_params

READS = (
    "studied_models",
    "tasks",
    "replicates",
    "ood_benchmarks",
    "heads.top_k",
    "heads.guided.candidates",
    "heads.screened",
    "evaluate.methods",
    "steer.utility",
    "statistics.bootstrap_resamples",
    "statistics.seed",
    "statistics.confidence",
    "statistics.equivalence_margin",
)


@entry
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--plots", type=Path, default=Path("plots"))
    p.add_argument("--out", type=Path, required=True, help="the HTML report")
    p.add_argument("--summary", type=Path, required=True, help="the report's tables as Markdown")
    args = p.parse_args()
    params = read_params(args.params, READS)
    models, tasks, st = params.studied_models, params.tasks, params.statistics
    results = read_study_results(args.data, args.metrics, models, list(params.ood_benchmarks))
    verdicts = study_verdicts(
        results,
        params.replicates,
        args.data,
        steer_utility=params.steer.utility,
        n_resamples=st.bootstrap_resamples,
        seed=st.seed,
        confidence=st.confidence,
        equivalence_margin=st.equivalence_margin,
    )
    heads = head_stabilities(
        args.data,
        models,
        tasks,
        params.heads.top_k,
        n_resamples=st.bootstrap_resamples,
        seed=st.seed,
        candidates=params.heads.guided.candidates,
        screen=(params.heads.screened.items, params.heads.screened.candidates),
    )
    sampled = sampled_ground_truths(
        args.data, results, models, params.evaluate.methods, n_resamples=st.bootstrap_resamples, seed=st.seed
    )
    documents = report_metrics(results, verdicts, heads, params.replicates, sampled)
    for name, document in documents.items():
        write_json(document, args.metrics / name)

    sections = report_sections(
        results,
        verdicts,
        documents["verdict_summary.json"],
        heads,
        sampled,
        tasks=tasks,
        replicates=params.replicates,
        equivalence_margin=st.equivalence_margin,
        steer_utility=params.steer.utility,
        data=args.data,
        plots=args.plots,
    )
    intro = f"Models: {', '.join(models)}; tasks: {', '.join(tasks)}."
    build_report("HONES report", intro, sections, args.out)
    with atomic_file(args.summary) as tmp:
        tmp.write_text(
            markdown_document(
                "HONES summary", intro + " Figures: the HTML report.", markdown_sections(sections, verdicts)
            )
        )


if __name__ == "__main__":
    main()
