// The `dcap serve` page: vanilla JS, no build step. Talks to GET /api/decoders and POST /api/caption.
"use strict";

(function () {
  const $ = (selector, root = document) => root.querySelector(selector);
  const maxUpload = Number(document.body.dataset.maxUpload || 10485760);
  const state = { decoders: [], image: null, imageName: "", timers: [] };

  const statusBox = $("#status");
  const errorBox = $("#error");
  const results = $("#results");

  function setStatus(text) { statusBox.textContent = text; }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function stopAnimations() {
    state.timers.forEach(clearTimeout);
    state.timers = [];
  }

  // ---------------------------------------------------------------------------------------------
  // decoders: controls and one card each
  // ---------------------------------------------------------------------------------------------
  function buildControls(decoders) {
    const choice = $("#decoder-choice");
    const steps = new Set();
    decoders.forEach((d) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = true;
      box.value = d.name;
      box.addEventListener("change", () => { renderCards(); if (state.image) caption(); });
      label.append(box, " " + d.name);
      choice.append(label);
      (d.step_options || []).forEach((k) => steps.add(k));
    });
    const select = $("#steps-select");
    [...steps].sort((a, b) => a - b).forEach((k) => {
      const option = document.createElement("option");
      option.value = String(k);
      option.textContent = String(k);
      select.append(option);
    });
    select.addEventListener("change", () => { if (state.image) caption(); });
    if (!steps.size) select.disabled = true;
  }

  function selectedDecoders() {
    return [...document.querySelectorAll("#decoder-choice input:checked")].map((box) => box.value);
  }

  function renderCards() {
    stopAnimations();
    results.textContent = "";
    const chosen = new Set(selectedDecoders());
    state.decoders.filter((d) => chosen.has(d.name)).forEach((d) => {
      const card = $("#card-template").content.firstElementChild.cloneNode(true);
      card.dataset.decoder = d.name;
      $(".name", card).textContent = d.name;
      $(".kind", card).textContent = d.kind;
      $(".kind", card).classList.add("kind-" + d.kind);
      $(".class-name", card).textContent = d["class"];
      results.append(card);
    });
  }

  function cardOf(name) {
    return results.querySelector(`.card[data-decoder="${CSS.escape(name)}"]`);
  }

  // ---------------------------------------------------------------------------------------------
  // results
  // ---------------------------------------------------------------------------------------------
  function stepsText(answer) {
    if (answer.steps === null || answer.steps === undefined) return "–";
    if (answer.kind === "autoregressive") return `${answer.steps} (1 per token)`;
    if (answer.kind === "iterative") return `${answer.steps} (parallel)`;
    return String(answer.steps);
  }

  // words of `text` that differ (by position) from `previous`, wrapped in <mark>
  function diffWords(text, previous) {
    const fragment = document.createDocumentFragment();
    const before = (previous || "").split(/\s+/);
    const words = text ? text.split(/\s+/) : [];
    if (!words.length) {
      const empty = document.createElement("em");
      empty.textContent = "(empty)";
      fragment.append(empty);
      return fragment;
    }
    words.forEach((word, i) => {
      if (i) fragment.append(" ");
      if (previous !== null && before[i] !== word) {
        const mark = document.createElement("mark");
        mark.textContent = word;
        fragment.append(mark);
      } else {
        fragment.append(word);
      }
    });
    return fragment;
  }

  // reveal the caption after every step, one per tick, in the list and in the headline
  function animateTrajectory(card, trajectory, finalCaption) {
    const list = $(".trajectory-list", card);
    const headline = $(".caption", card);
    list.textContent = "";
    (card.timers || []).forEach(clearTimeout);  // a replay restarts this card's animation
    card.timers = [];
    const delay = Math.max(60, Math.min(400, 3000 / Math.max(1, trajectory.length)));
    card.dataset.animating = "true";
    trajectory.forEach((text, i) => {
      const timer = setTimeout(() => {
        const item = document.createElement("li");
        item.append(diffWords(text, i ? trajectory[i - 1] : null));
        list.append(item);
        list.scrollTop = list.scrollHeight;  // keep the newest step in view
        const last = i === trajectory.length - 1;
        headline.textContent = last ? (finalCaption || "(empty caption)") : (text || "…");
        if (!last) {
          const counter = document.createElement("span");
          counter.className = "step-counter";
          counter.textContent = `step ${i + 1}/${trajectory.length}`;
          headline.append(counter);
        } else {
          item.classList.add("final");
          card.dataset.animating = "false";
        }
      }, delay * i);
      card.timers.push(timer);
      state.timers.push(timer);
    });
  }

  function showAnswer(name, answer) {
    const card = cardOf(name);
    if (!card) return;
    $(".caption", card).textContent = answer.caption || "(empty caption)";
    $(".ms", card).textContent = `${answer.ms.toFixed(1)} ms`;
    $(".steps", card).textContent = stepsText(answer);
    const box = $(".trajectory", card);
    if (Array.isArray(answer.trajectory)) {
      box.hidden = false;
      $(".replay", card).onclick = () => animateTrajectory(card, answer.trajectory, answer.caption);
      animateTrajectory(card, answer.trajectory, answer.caption);
    } else {
      box.hidden = true;
      card.dataset.animating = "false";
    }
    card.dataset.state = "done";
  }

  async function readError(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error;
    } catch (_) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }

  async function caption() {
    if (!state.image) return;
    const names = selectedDecoders();
    showError("");
    renderCards();
    if (!names.length) { setStatus("Pick at least one decoder."); return; }
    results.querySelectorAll(".card").forEach((card) => {
      card.dataset.state = "busy";
      $(".caption", card).textContent = "captioning…";
    });
    const form = new FormData();
    form.append("image", state.image, state.imageName || "image");
    form.append("decoders", names.join(","));
    const steps = $("#steps-select").value;
    if (steps) form.append("steps", steps);
    setStatus("Captioning…");
    $("#rerun").disabled = true;
    const started = performance.now();
    try {
      const response = await fetch("api/caption", { method: "POST", body: form });
      if (!response.ok) throw new Error(await readError(response));
      const answers = await response.json();
      Object.entries(answers).forEach(([name, answer]) => showAnswer(name, answer));
      setStatus(`Done in ${Math.round(performance.now() - started)} ms (round trip).`);
    } catch (error) {
      results.querySelectorAll(".card").forEach((card) => {
        card.dataset.state = "error";
        $(".caption", card).textContent = "—";
      });
      showError(error.message || String(error));
      setStatus("Failed.");
    } finally {
      $("#rerun").disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // choosing an image: file input, drag and drop, samples
  // ---------------------------------------------------------------------------------------------
  function useImage(blob, name) {
    showError("");
    if (blob.size > maxUpload) {
      showError(`That file is ${(blob.size / 1048576).toFixed(1)} MB; the limit is ${(maxUpload / 1048576).toFixed(0)} MB.`);
      return;
    }
    state.image = blob;
    state.imageName = name;
    const preview = $("#preview");
    const img = $("#preview-img");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.alt = name;
    $("#preview-name").textContent = name;
    preview.classList.remove("empty");
    caption();
  }

  $("#image-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useImage(file, file.name);
  });

  const drop = $("#drop-zone");
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) useImage(file, file.name);
  });

  document.querySelectorAll(".sample").forEach((button) => button.addEventListener("click", async () => {
    try {
      const response = await fetch(button.dataset.src);
      if (!response.ok) throw new Error(`cannot load sample (${response.status})`);
      useImage(await response.blob(), button.title);
    } catch (error) {
      showError(error.message || String(error));
    }
  }));

  $("#rerun").addEventListener("click", caption);

  // ---------------------------------------------------------------------------------------------
  // start
  // ---------------------------------------------------------------------------------------------
  fetch("api/decoders")
    .then(async (response) => {
      if (!response.ok) throw new Error(await readError(response));
      return response.json();
    })
    .then((data) => {
      state.decoders = data.decoders;
      buildControls(data.decoders);
      renderCards();
      document.body.dataset.ready = "true";
      setStatus(`${data.decoders.length} decoder(s) loaded. Choose an image.`);
    })
    .catch((error) => {
      showError(`Cannot list the decoders: ${error.message || error}`);
      setStatus("Failed.");
    });
})();
