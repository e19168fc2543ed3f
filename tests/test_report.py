from fashionlabel.label.pipeline import label_shards
from fashionlabel.report import write_report


def test_report_has_every_chart(ray_session, small_shards, tiny_model, tmp_path):
    label_shards(str(small_shards), str(tiny_model), str(tmp_path / "labels"), "2026-02-01")
    r = write_report(str(tmp_path / "labels"), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    heads = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage",
             "attributes"]
    assert r["charts"] == [f"dist-{h}" for h in heads] + ["review"]
    for c in r["charts"]:
        assert f'id="{c}"><img alt="{c}" src="data:image/png;base64,' in html
    assert r["products"] == 600 and "run_date=2026-02-01" in html
