# nbgrader configuration of the itmkit course (read by every `nbgrader` command run in this folder).
# Teacher's guide: docs/teaching.md.
c = get_config()  # noqa: F821 (defined by traitlets when it loads this file)

c.CourseDirectory.course_id = "itmkit"
# A cell's first import of torch and itmkit takes a few seconds on a classroom CPU; the exercises
# themselves run in well under a second.
c.Execute.timeout = 120
