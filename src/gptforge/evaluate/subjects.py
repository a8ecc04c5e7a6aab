"""C-Eval and CMMLU: Chinese multiple choice in their published layouts, scored as lm-evaluation-harness's
`ceval-valid` and `cmmlu` groups score them.

A directory of subject CSV files (columns question or Question, A, B, C, D, answer or Answer):
    C-Eval (ceval-exam.zip): val/SUBJECT_val.csv scored, dev/SUBJECT_dev.csv the few-shot examples
    CMMLU (cmmlu_v1_0_1.zip): test/SUBJECT.csv scored, dev/SUBJECT.csv the few-shot examples
Each item's context is the subject's instruction (naming the subject in Chinese), the first --num-fewshot dev items
of that subject with their answer letter (the harness's first_n sampler), then the question and its four options;
the letters A-D are the choices. --limit N scores the first N items of each subject; acc and acc_norm are the
means over all items (the harness's groups weight subjects by size), with each subject's acc beside them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DataError
from .records import Item

# The subjects' names as the benchmarks publish them (English file name = Chinese name).
CEVAL_SUBJECTS = """
accountant=注册会计师 advanced_mathematics=高等数学 art_studies=艺术学 basic_medicine=基础医学
business_administration=工商管理 chinese_language_and_literature=中国语言文学 civil_servant=公务员
clinical_medicine=临床医学 college_chemistry=大学化学 college_economics=大学经济学 college_physics=大学物理
college_programming=大学编程 computer_architecture=计算机组成 computer_network=计算机网络
discrete_mathematics=离散数学 education_science=教育学 electrical_engineer=注册电气工程师
environmental_impact_assessment_engineer=环境影响评价工程师 fire_engineer=注册消防工程师
high_school_biology=高中生物 high_school_chemistry=高中化学 high_school_chinese=高中语文
high_school_geography=高中地理 high_school_history=高中历史 high_school_mathematics=高中数学
high_school_physics=高中物理 high_school_politics=高中政治
ideological_and_moral_cultivation=思想道德修养与法律基础 law=法学 legal_professional=法律职业资格 logic=逻辑学
mao_zedong_thought=毛泽东思想和中国特色社会主义理论体系概论 marxism=马克思主义基本原理
metrology_engineer=注册计量师 middle_school_biology=初中生物 middle_school_chemistry=初中化学
middle_school_geography=初中地理 middle_school_history=初中历史 middle_school_mathematics=初中数学
middle_school_physics=初中物理 middle_school_politics=初中政治 modern_chinese_history=近代史纲要
operating_system=操作系统 physician=医师资格 plant_protection=植物保护 probability_and_statistics=概率统计
professional_tour_guide=导游资格 sports_science=体育学 tax_accountant=税务师 teacher_qualification=教师资格
urban_and_rural_planner=注册城乡规划师 veterinary_medicine=兽医学
"""
CMMLU_SUBJECTS = """
agronomy=农学 anatomy=解剖学 ancient_chinese=古汉语 arts=艺术学 astronomy=天文学 business_ethics=商业伦理
chinese_civil_service_exam=中国公务员考试 chinese_driving_rule=中国驾驶规则 chinese_food_culture=中国饮食文化
chinese_foreign_policy=中国外交政策 chinese_history=中国历史 chinese_literature=中国文学
chinese_teacher_qualification=中国教师资格 clinical_knowledge=临床知识 college_actuarial_science=大学精算学
college_education=大学教育学 college_engineering_hydrology=大学工程水文学 college_law=大学法律
college_mathematics=大学数学 college_medical_statistics=大学医学统计 college_medicine=大学医学
computer_science=计算机科学 computer_security=计算机安全 conceptual_physics=概念物理学
construction_project_management=建设工程管理 economics=经济学 education=教育学 electrical_engineering=电气工程
elementary_chinese=小学语文 elementary_commonsense=小学常识 elementary_information_and_technology=小学信息技术
elementary_mathematics=初等数学 ethnology=民族学 food_science=食品科学 genetics=遗传学 global_facts=全球事实
high_school_biology=高中生物 high_school_chemistry=高中化学 high_school_geography=高中地理
high_school_mathematics=高中数学 high_school_physics=高中物理学 high_school_politics=高中政治
human_sexuality=人类性行为 international_law=国际法学 journalism=新闻学 jurisprudence=法理学
legal_and_moral_basis=法律与道德基础 logical=逻辑学 machine_learning=机器学习 management=管理学
marketing=市场营销 marxist_theory=马克思主义理论 modern_chinese=现代汉语 nutrition=营养学 philosophy=哲学
professional_accounting=专业会计 professional_law=专业法学 professional_medicine=专业医学
professional_psychology=专业心理学 public_relations=公共关系 security_study=安全研究 sociology=社会学
sports_science=体育学 traditional_chinese_medicine=中医中药 virology=病毒学 world_history=世界历史
world_religions=世界宗教
"""
LAYOUTS = {  # benchmark: (subject names, scored split, its file suffix, the instruction before each item)
    "ceval": (CEVAL_SUBJECTS, "val", "_val", "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n"),
    "cmmlu": (CMMLU_SUBJECTS, "test", "", "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"),
}
LETTERS = ["A", "B", "C", "D"]


def subject_names(benchmark: str) -> dict[str, str]:
    return dict(pair.split("=") for pair in LAYOUTS[benchmark][0].split())


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(prompt, answer letter) of each row of a subject file: the question stripped, the four options, 答案："""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for n, row in enumerate(rows, 2):
        row = {(k or "").strip().lower(): v for k, v in row.items()}
        missing = [k for k in ("question", *map(str.lower, LETTERS), "answer") if k not in row or row[k] is None]
        if missing:
            raise DataError(f"{path}:{n}: no column {missing[0]!r} (a subject file has question, A, B, C, D, answer)")
        if row["answer"].strip() not in LETTERS:
            raise DataError(f"{path}:{n}: answer must be one of A, B, C, D, got {row['answer']!r}")
        options = "".join(f"\n{letter}. {row[letter.lower()]}" for letter in LETTERS)
        out.append((f"{row['question'].strip()}{options}\n答案：", row["answer"].strip()))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def read_subjects(benchmark: str, directory: str | Path, limit: int | None = None,
                  num_fewshot: int = 0) -> list[Item]:
    """The items of every subject file in the benchmark's scored split under directory, subject by subject."""
    names, split, suffix, instruction = LAYOUTS[benchmark]
    names, directory = subject_names(benchmark), Path(directory)
    files = sorted((directory / split).glob(f"*{suffix}.csv"))
    if not files:
        raise DataError(f"{directory}: no {split}/SUBJECT{suffix}.csv files; {benchmark} expects the unzipped "
                        f"directory with {split}/ and dev/")
    items = []
    for path in files:
        subject = path.name.removesuffix(f"{suffix}.csv")
        if subject not in names:
            raise DataError(f"{path}: unknown {benchmark} subject {subject!r}")
        shots = ""
        if num_fewshot:
            dev = directory / "dev" / f"{subject}{'_dev' if suffix else ''}.csv"
            if not dev.is_file():
                raise DataError(f"{dev}: no such file (--num-fewshot takes the first examples of the dev split)")
            examples = read_csv(dev)
            if num_fewshot > len(examples):
                raise DataError(f"{dev}: --num-fewshot {num_fewshot} needs that many examples, the file has "
                                f"{len(examples)}")
            shots = "".join(f"{q} {a}\n\n" for q, a in examples[:num_fewshot])
        head = instruction.format(names[subject]) + shots
        items += [Item(head + q, list(LETTERS), LETTERS.index(a), group=subject)
                  for q, a in read_csv(path)[:limit]]
    return items
