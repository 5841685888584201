// The console's only script: copy buttons, and a confirmation before what cannot be undone.
"use strict";

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  const note = document.getElementById(button.dataset.copy + "-copied");
  const text = source ? source.textContent.trim() : "";
  const done = () => { if (note) note.textContent = "Copied to the clipboard."; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => select(source));
  } else {
    select(source);
    if (document.execCommand("copy")) done();
  }
});

function select(node) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
