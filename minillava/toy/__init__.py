"""A synthetic world for laptops: coloured shapes at 64x64 px with LLaVA-format data.

world.py renders scenes and writes their symbolic caps_boxes records; teacher.py, a
rule-based stand-in for GPT-4, turns those records into stage-1, stage-2, text-only and
benchmark data. `build_world(out_dir)` makes everything.
"""
from .teacher import bench_questions, normalize_answer, text_only_records
from .world import IMAGE_SIZE, build_world, sample_scene
