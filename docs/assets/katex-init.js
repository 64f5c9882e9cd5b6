// Renders the maths that pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \]
// inside .arithmatex elements, with the KaTeX bundled in docs/assets/katex (no network).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    ignoredClasses: ["highlight"],
    throwOnError: false,
  });
});
